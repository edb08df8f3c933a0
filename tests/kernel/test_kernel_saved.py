"""The saved set of the booted kernel (tests/data/formats/<version>) still
equals what that kernel reports: the same tracepoints in the skb, sock and
tcp systems, and the same BTF facts. Every unit test on other kernels
trusts those files. Runs where the smoke suite runs (the guests of
`make test-kernel`; the host with TCPTRACE_KERNEL_SMOKE=1), and fails, not
skips, where this kernel has no saved set: harvest one
(tests/kernel/harvest.py).

Beside it, test_kernel_smoke.py compares each saved format file field by
field with the kernel's own.
"""

import json
import os

import harvest
from tcptrace import btf, headers, tracefs

RELEASE = os.uname().release


def saved_set():
    """This kernel's saved set: its very release, or else the one of the
    same major.minor read from a running kernel (one with BTF facts)."""
    candidates = []
    for name in sorted(os.listdir(harvest.FORMATS)):
        path = os.path.join(harvest.FORMATS, name)
        try:
            with open(os.path.join(path, "KERNEL_RELEASE")) as f:
                candidates.append((f.read().strip(), path))
        except OSError:
            continue
    for release, path in candidates:
        if release == RELEASE:
            return path
    for release, path in candidates:
        same = headers.version_triple(release)[:2] == headers.version_triple(RELEASE)[:2]
        if same and os.path.exists(os.path.join(path, "btf.json")):
            return path
    raise AssertionError(f"no saved set for {RELEASE} in tests/data/formats: "
                         "python tests/kernel/harvest.py tests/data/formats/<major.minor>")


def test_saved_set_has_every_tracepoint_of_this_kernel(bpf):
    saved = saved_set()
    root = tracefs.ensure_mounted()
    assert root, "tracefs is not mounted"
    for category in harvest.CATEGORIES:
        live = sorted(n for n in os.listdir(os.path.join(root, "events", category))
                      if os.path.isfile(os.path.join(root, "events", category, n, "format")))
        kept = sorted(n[: -len(".format")] for n in os.listdir(os.path.join(saved, category)))
        assert kept == live, category


def test_saved_btf_facts_are_this_kernels(bpf):
    """Struct offsets of the saved set, member by member, as this kernel's
    BTF lays them out now (for every struct any program reads)."""
    with open(os.path.join(saved_set(), "btf.json")) as f:
        saved = json.load(f)
    assert os.path.exists(btf.VMLINUX), "this kernel has no BTF"
    live = harvest.live_btf_facts()
    assert set(live) == set(saved), "structs: harvest this kernel's set again"
    for struct in saved:
        assert live[struct] == saved[struct], struct
    # The same answer as the reader the tools use.
    members = ["bytes_acked", "bytes_received"]
    assert btf.kernel_offsets("tcp_sock", members, cache=False) == {
        m: tuple(saved["tcp_sock"][m]) for m in members}
