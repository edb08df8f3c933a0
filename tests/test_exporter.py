"""tcptrace exporter without traffic: its command line, the kernel side's
struct against the Python layout, the program for every saved kernel (and,
privileged, through the verifier), and metric families from known counts,
rendered and parsed back as Prometheus reads them."""

import os
import re
import shutil
import struct
import subprocess

import helpers
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tcptrace import codegen, exporter, headers, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.errors import BuildError, KernelTooOldError
from tcptrace.spec import DecodeContext

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")
KERNELS = sorted(
    (d for d in os.listdir(FORMATS) if os.path.isfile(os.path.join(FORMATS, d, "KERNEL_RELEASE"))),
    key=headers.version_triple,
)
SOURCE = codegen.bpf_source(exporter.SPEC.bpf)
HEALTH = {"kernel": "6.18.0", "bcc": "0.26.0", "build": "header-free",
          "tracepoints": [tp.name for tp in exporter.SPEC.tracepoints],
          "attached": ["sock:inet_sock_set_state", "tcp:tcp_send_reset"]}
REASONS = {0: "NOT_SPECIFIED", 1: "NO_SOCKET", 11: "TCP_ABORT_ON_CLOSE", 14: "TCP_STATE"}


# -- the command line ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "9464", ":9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0",
                                   "127.0.0.1:65536", "127.0.0.1:99999999", "localhost:9464",
                                   "256.1.1.1:80", "::1:9464", "[::1]", "[::1]:", "[127.0.0.1]:80",
                                   "[fe80::zz]:80", "127.0.0.1:80;rm -rf /", "127.0.0.1:8o", " 127.0.0.1:80"])
def test_bad_listen_is_a_usage_error(value):
    # --ebpf: a value wrongly accepted prints the program instead of serving.
    result = CliRunner().invoke(cli, ["exporter", "--listen", value, "--ebpf", "--formats", os.path.join(FORMATS, "6.18")])
    assert result.exit_code == 2, result.output
    assert "--listen" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["--top-remotes", "0"], ["--top-remotes", str(exporter.MAX_TOP_REMOTES + 1)],
                                  ["--top-cgroups", "0"], ["--top-cgroups", str(exporter.MAX_TOP_CGROUPS + 1)],
                                  ["--top-cgroups", "-1"],
                                  ["--top-remotes", "x"], ["-L", "0"], ["-D", "80,,81"], ["-p", "1"],
                                  ["-o", "json"]])
def test_bad_options_are_usage_errors(args):
    result = CliRunner().invoke(cli, ["exporter", *args, "--ebpf", "--formats", os.path.join(FORMATS, "6.18")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value,parsed", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464, 4)),
    ("0.0.0.0:1", ("0.0.0.0", 1, 4)),
    ("[::1]:65535", ("::1", 65535, 6)),
    ("[::]:9464", ("::", 9464, 6)),
    ("[2001:DB8::1]:80", ("2001:db8::1", 80, 6)),
])
def test_listen_values(value, parsed):
    assert exporter.parse_listen(value) == parsed


def test_default_listen_is_loopback():
    assert exporter.parse_listen(exporter.DEFAULT_LISTEN) == ("127.0.0.1", 9464, 4)


def test_help_documents_every_metric():
    result = CliRunner().invoke(cli, ["exporter", "--help"])
    assert result.exit_code == 0
    for metric in exporter.METRICS:
        assert metric.signature in result.output, metric.name
        assert metric.help.split()[0] in result.output
    for example in exporter.SPEC.examples:
        assert example.command in result.output
    assert exporter.DEFAULT_LISTEN in result.output
    assert "exporter" in CliRunner().invoke(cli, ["--help"]).output


def test_metric_names_follow_prometheus_conventions():
    names = [m.name for m in exporter.METRICS]
    assert len(names) == len(set(names))
    for m in exporter.METRICS:
        assert re.fullmatch(r"tcptrace_[a-z0-9_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert m.kind in ("counter", "gauge", "histogram")
        assert all(re.fullmatch(r"[a-z_]+", label) for label in m.labels)
    assert "| `tcptrace_tcp_resets_total` | counter | `direction`, `reason` |" in exporter.markdown_table()


def test_ebpf_prints_the_program_without_root():
    result = CliRunner().invoke(cli, ["exporter", "--ebpf", "--formats", os.path.join(FORMATS, "6.18"),
                                      "-L", "443", "--top-remotes", "5"])
    assert result.exit_code == 0, result.output
    assert "#define FILTER_LPORTS 1" in result.output and "#define TOP_REMOTES 1024" in result.output
    assert "#define TOP_CGROUPS" not in result.output
    assert "int on_tcp_send_reset(struct tp_tcp_send_reset *args)" in result.output


# -- the kernel side -----------------------------------------------------------------


def test_slot_counts_and_sizes_are_the_programs():
    for name in ("STATE_SLOTS", "HIST_SLOTS", "REASON_SLOTS", "REASON_OTHER", "REASON_NONE", "ERRNO_SLOTS",
                 "CA_SLOTS"):
        assert re.search(rf"^#define {name} {getattr(exporter, name)}$", SOURCE, re.M), name
    # Indexes are masked (SLOT()): every array size is a power of two.
    for name, ftype in exporter.COUNTERS.fields:
        if "[" in ftype:
            count = int(ftype[4:-1])
            assert count & (count - 1) == 0, name
    # Per-CPU values must be a multiple of 8 bytes, and fit the kernel's per-CPU allocator.
    assert exporter.COUNTERS.size % 8 == 0 and exporter.COUNTERS.size <= 32768


def test_program_emits_nothing():
    assert "#define TCPTRACE_NO_EVENTS 1" in SOURCE
    assert not re.search(r"\bemit\(|events\.|perf_submit|ringbuf_output", SOURCE)
    assert not re.search(r"\bk(ret)?probe__|attach_k(ret)?probe", SOURCE)


def fixed_btf(struct_name, members):
    return helpers.fixed_btf(struct_name, members)


def no_btf(struct_name, members):
    return None


def kernel_options(kernel, **kw):
    release = tracefs.FormatSource(os.path.join(FORMATS, kernel)).kernel_release()
    tool = {"top_remotes": kw.pop("top_remotes", None), "top_cgroups": kw.pop("top_cgroups", None)}
    opts = runtime.RunOptions(**kw, tool=tool)
    opts.buffer = "ring" if headers.version_triple(release) >= (5, 8, 0) else "perf"
    return release, opts


VARIANTS = {"plain": {}, "filtered": dict(lports=(443,), rports=(8443,), top_remotes=10, top_cgroups=10)}


@pytest.mark.parametrize("kernel", KERNELS)
def test_program_for_saved_kernels(kernel):
    src = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    for kw in VARIANTS.values():
        release, opts = kernel_options(kernel, **kw)
        for btf_offsets in (fixed_btf, no_btf):
            try:
                plan = runtime.plan(exporter.SPEC, opts, src, release=release, btf_offsets=btf_offsets)
            except KernelTooOldError as e:
                assert "4.16" in str(e)
                break
            assert "sock:inet_sock_set_state" in plan.formats
            for tp in exporter.SPEC.tracepoints:
                if tp.name in plan.formats:
                    assert f"int {tp.function}(struct tp_{tp.event} *args)" in plan.text
            assert ("#define OFF_TCP_SOCK_BYTES_ACKED" in plan.text) == (btf_offsets is fixed_btf)
            assert ("#define TOP_REMOTES" in plan.text) == bool(kw)
            assert ("#define TOP_CGROUPS 1024" in plan.text) == bool(kw)
            # The socket's own cgroup where BTF says where it is, else the connecting task's.
            assert ("#define WORKLOAD_SOCKET_CGROUP" in plan.text) == (btf_offsets is fixed_btf)


@pytest.mark.parametrize("kernel", KERNELS)
def test_program_passes_the_verifier(bpf, kernel):
    """Compiled header-free for each saved kernel's formats and loaded into
    this kernel, in each variant, with and without BTF."""
    bcc, _where = runtime.find_bcc()
    src = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    for name, kw in VARIANTS.items():
        release, opts = kernel_options(kernel, **kw)
        for btf_offsets in (fixed_btf, no_btf):
            try:
                plan = runtime.plan(exporter.SPEC, opts, src, release=release, btf_offsets=btf_offsets)
            except KernelTooOldError:
                return
            try:
                program, mode = runtime.build_program(bcc, plan.text, release, f"exporter ({name}) for {kernel}")
            except BuildError as e:
                pytest.fail(str(e))
            try:
                assert mode == "header-free"
                helpers.load_functions(bcc, program, exporter.SPEC, plan)
            finally:
                program.cleanup()


# -- from counts to what Prometheus reads --------------------------------------------


def counters(**values):
    """A zeroed struct metrics with some fields set, as the kernel's bytes."""
    out = {}
    for name, ftype in exporter.COUNTERS.fields:
        count = int(ftype[4:-1]) if "[" in ftype else 0
        out[name] = [0] * count if count else 0
    for name, value in values.items():
        if isinstance(value, dict):
            for slot, n in value.items():
                out[name][slot] = n
        else:
            out[name] = value
    flat = []
    for name, _ftype in exporter.COUNTERS.fields:
        flat += out[name] if isinstance(out[name], list) else [out[name]]
    return struct.pack(f"<{len(flat)}Q", *flat)


def scrape(snapshot, top_remotes=0, symbols=None, ctx=None, health=HEALTH, top_cgroups=0):
    """The families rendered as the exposition format and parsed back:
    {(sample name, labels): value}."""
    ctx = ctx or DecodeContext(symbols={"tcp:tcp_send_reset.reason": symbols if symbols is not None else REASONS})

    class Fixed:
        def collect(self):
            return exporter.families(snapshot, ctx, health, top_remotes, top_cgroups)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, families, text


def snapshot_of(*per_cpu, lost=0, untracked=0, remotes=(), cgroups=None):
    return exporter.Snapshot(exporter.sum_cpus(per_cpu), lost, untracked, list(remotes), cgroups=cgroups or {})


def test_cpus_are_summed():
    a = counters(transitions={7 * 16 + 2: 3}, connects_ok=2, duration_ns_sum=10)
    b = counters(transitions={7 * 16 + 2: 4, 2 * 16 + 1: 1}, connects_ok=5, duration_ns_sum=7)
    c = exporter.sum_cpus([a, b])
    assert c["transitions"][7 * 16 + 2] == 7 and c["transitions"][2 * 16 + 1] == 1
    assert c["connects_ok"] == 7 and c["duration_ns_sum"] == 17
    assert sum(c["transitions"]) == 8 and sum(c["connect_errors"]) == 0
    with pytest.raises(ValueError):
        exporter.sum_cpus([a[:-8]])


def test_transitions_by_state_name():
    samples, _fam, _text = scrape(snapshot_of(counters(transitions={7 * 16 + 2: 5, 2 * 16 + 1: 4, 13 * 16 + 7: 1})))
    name = "tcptrace_tcp_state_transitions_total"
    assert samples[(name, (("from", "CLOSE"), ("to", "SYN_SENT")))] == 5
    assert samples[(name, (("from", "SYN_SENT"), ("to", "ESTABLISHED")))] == 4
    assert samples[(name, (("from", "13"), ("to", "CLOSE")))] == 1  # a state the kernel may add later
    # The changes the kernel makes are there from the start, at 0; another only once it happened.
    assert len([k for k in samples if k[0] == name]) == len(exporter.TRANSITIONS) + 1
    assert samples[(name, (("from", "LAST_ACK"), ("to", "CLOSE")))] == 0


def test_histograms_are_cumulative_powers_of_two():
    # Slot k holds values in (2^(k-1), 2^k]: 1002 bytes sit in slot 10 (le=1024).
    snap = snapshot_of(counters(tx_bytes={10: 3, 0: 1}, tx_bytes_sum=3 * 1002,
                                duration_ns={5: 1, 20: 2}, duration_ns_sum=2_000_123))
    samples, families, _text = scrape(snap)
    tx = "tcptrace_tcp_session_sent_bytes"
    assert families[tx].type == "histogram"
    assert samples[(tx + "_bucket", (("le", "1.0"),))] == 1
    assert samples[(tx + "_bucket", (("le", "512.0"),))] == 1
    assert samples[(tx + "_bucket", (("le", "1024.0"),))] == 4
    assert samples[(tx + "_bucket", (("le", "+Inf"),))] == 4
    assert samples[(tx + "_count", ())] == 4 and samples[(tx + "_sum", ())] == 3006
    dur = "tcptrace_tcp_session_duration_seconds"
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in samples.items() if k[0] == dur + "_bucket")
    assert buckets[0] == (2**10 / 1e9, 1)  # slots below the first bucket fold into it
    assert [v for le, v in buckets if le == 2**20 / 1e9] == [3]
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert len(buckets) == len(exporter.DURATION_POWERS) + 1
    assert samples[(dur + "_sum", ())] == pytest.approx(0.002000123)


def test_srtt_histogram_in_seconds():
    # tcp_probe's srtt is in microseconds: 40 us sits in slot 6 (le=64 us).
    snap = snapshot_of(counters(srtt_us={6: 5, 0: 1, 20: 2}, srtt_us_sum=5 * 40 + 1 + 2 * 1_000_000))
    samples, families, _text = scrape(snap)
    rtt = "tcptrace_tcp_srtt_seconds"
    assert families[rtt].type == "histogram"
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in samples.items() if k[0] == rtt + "_bucket")
    assert buckets[0] == (1e-6, 1)
    assert dict(buckets)[32e-6] == 1 and dict(buckets)[64e-6] == 6 and dict(buckets)[2**20 * 1e-6] == 8
    assert buckets[-1] == (float("inf"), 8) and len(buckets) == len(exporter.SRTT_POWERS) + 1
    assert samples[(rtt + "_count", ())] == 8
    assert samples[(rtt + "_sum", ())] == pytest.approx(2.000201)


def test_congestion_state_transitions_by_name():
    health = dict(HEALTH, attached=[*HEALTH["attached"], "tcp:tcp_cong_state_set"])
    ca = exporter.CA_SLOTS
    snap = snapshot_of(counters(ca_transitions={0 * ca + 3: 2, 3 * ca + 0: 2, 0 * ca + 4: 1, 4 * ca + 7: 1}))
    samples, _families, _text = scrape(snap, health=health)
    moves = {(dict(k)["from"], dict(k)["to"]): v for k, v in
             by_labels(samples, "tcptrace_tcp_congestion_state_transitions_total").items()}
    names = ("Open", "Disorder", "CWR", "Recovery", "Loss")
    # Every change between known states from the first scrape; a number the kernel's enum lacks as the number.
    assert set(moves) == {(a, b) for a in names for b in names if a != b} | {("Loss", "7")}
    assert moves[("Open", "Recovery")] == moves[("Recovery", "Open")] == 2
    assert moves[("Open", "Loss")] == moves[("Loss", "7")] == 1
    assert sum(moves.values()) == 6
    # A format that names the states itself is followed.
    ctx = DecodeContext(symbols={exporter.CA_SYMBOLS: {0: "OPEN", 1: "LOSS"}})
    samples, _families, _text = scrape(snapshot_of(counters(ca_transitions={1: 3})), ctx=ctx, health=health)
    assert by_labels(samples, "tcptrace_tcp_congestion_state_transitions_total") == {
        (("from", "LOSS"), ("to", "OPEN")): 0, (("from", "OPEN"), ("to", "LOSS")): 3}
    # Not attached (before 5.19): not served.
    samples, _families, _text = scrape(snap)
    assert not by_labels(samples, "tcptrace_tcp_congestion_state_transitions_total")


def test_resets_by_direction_and_kernel_reason():
    snap = snapshot_of(counters(resets_sent={1: 2, 11: 1, 40: 1, exporter.REASON_OTHER: 1,
                                             exporter.REASON_NONE: 3}, resets_received=4))
    samples, _fam, _text = scrape(snap)
    name = "tcptrace_tcp_resets_total"
    got = {k[1]: v for k, v in samples.items() if k[0] == name}
    assert got == {
        (("direction", "sent"), ("reason", "NO_SOCKET")): 2,
        (("direction", "sent"), ("reason", "TCP_ABORT_ON_CLOSE")): 1,
        (("direction", "sent"), ("reason", "40")): 1,  # a reason this kernel's table lacks
        (("direction", "sent"), ("reason", "OTHER")): 1,
        (("direction", "sent"), ("reason", "none")): 3,
        (("direction", "received"), ("reason", "none")): 4,
        # this kernel's other reasons, at 0 (HEALTH: tcp_send_reset attached)
        (("direction", "sent"), ("reason", "NOT_SPECIFIED")): 0,
        (("direction", "sent"), ("reason", "TCP_STATE")): 0,
    }


def test_connect_results_as_the_connect_tool_names_them():
    snap = snapshot_of(counters(connects_ok=9, connects_reset=2, connects_unknown=1,
                                connect_errors={111: 1, 110: 3, 0: 4, 113: 2, 255: 1}))
    samples, _fam, _text = scrape(snap)
    got = {dict(k[1])["result"]: v for k, v in samples.items() if k[0] == "tcptrace_tcp_connects_total"}
    # REFUSED: a reset during the handshake, or ECONNREFUSED from ICMP.
    assert got == {"OK": 9, "REFUSED": 3, "FAILED": 1, "TIMEOUT": 3, "CLOSED": 4, "EHOSTUNREACH": 2, "OTHER": 1}


def test_retransmits_by_state():
    snap = snapshot_of(counters(retransmits={1: 7, 2: 1, 0: 2}, synack_retransmits=3))
    samples, _fam, _text = scrape(snap)
    assert samples[("tcptrace_tcp_retransmits_total", (("state", "ESTABLISHED"),))] == 7
    assert samples[("tcptrace_tcp_retransmits_total", (("state", "SYN_SENT"),))] == 1
    assert samples[("tcptrace_tcp_retransmits_total", (("state", "unknown"),))] == 2
    assert samples[("tcptrace_tcp_synack_retransmits_total", ())] == 3


def test_health():
    samples, _fam, _text = scrape(snapshot_of(counters(), lost=3, untracked=2))
    assert samples[("tcptrace_up", ())] == 1
    assert samples[("tcptrace_lost_events_total", ())] == 3
    assert samples[("tcptrace_untracked_sockets_total", ())] == 2
    assert samples[("tcptrace_programs_loaded", ())] == 2
    attached = {dict(k[1])["tracepoint"]: v for k, v in samples.items() if k[0] == "tcptrace_tracepoint_attached"}
    assert attached == {tp: (1 if tp in HEALTH["attached"] else 0) for tp in HEALTH["tracepoints"]}
    [info] = [dict(k[1]) for k in samples if k[0] == "tcptrace_build_info"]
    assert info == {"version": exporter.__version__, "kernel": "6.18.0", "bcc": "0.26.0", "build": "header-free"}


def test_counters_unreadable_means_up_zero():
    samples, _fam, _text = scrape(None)
    assert samples[("tcptrace_up", ())] == 0
    assert not any(k[0].startswith("tcptrace_tcp_") for k in samples)


def test_top_remotes_are_bounded():
    remotes = [(f"10.0.0.{i}", i, 100 - i) for i in range(1, 50)] + [("2001:db8::1", 0, 0)]
    snap = snapshot_of(counters(), remotes=remotes)
    samples, _fam, _text = scrape(snap, top_remotes=3)
    conns = {dict(k[1])["remote"]: v for k, v in samples.items() if k[0] == "tcptrace_remote_connections_total"}
    retr = {dict(k[1])["remote"]: v for k, v in samples.items() if k[0] == "tcptrace_remote_retransmits_total"}
    assert conns == {"10.0.0.49": 49, "10.0.0.48": 48, "10.0.0.47": 47}
    assert retr == {"10.0.0.1": 99, "10.0.0.2": 98, "10.0.0.3": 97}
    samples, _fam, _text = scrape(snap)
    assert not any(k[0].startswith("tcptrace_remote_") for k in samples)  # off by default


def test_remote_map_bytes_decode():
    key = struct.pack("<16sH6x", bytes([127, 0, 0, 1]) + bytes(12), 2)
    key6 = struct.pack("<16sH6x", bytes(15) + b"\x01", 10)
    value = struct.pack("<QQ", 5, 6)
    assert exporter.decode_remotes([(key, value), (key6, value)]) == [("127.0.0.1", 5, 6), ("::1", 5, 6)]


def test_every_declared_metric_is_served_and_nothing_else():
    remotes = [("10.0.0.1", 1, 1)]
    full = counters(transitions={1: 1}, retransmits={1: 1}, resets_sent={1: 1}, connects_ok=1)
    ctx, health = kernel_context("6.18")
    cgroups = {"/system.slice/nginx.service": (1, 1, 0, 1, 1, 0)}
    _samples, families, text = scrape(snapshot_of(full, remotes=remotes, cgroups=cgroups), top_remotes=5, ctx=ctx,
                                      health=health, top_cgroups=5)
    served = {f.name for f in families.values()}
    declared = {m.name[: -len("_total")] if m.kind == "counter" else m.name for m in exporter.METRICS}
    assert served == declared
    for m in exporter.METRICS:
        assert f"# HELP {m.name} {m.help}" in text.replace("\\\\", "\\"), m.name


def test_top_cgroups_are_bounded_and_labelled():
    cid = "a" * 64
    cgroups = {f"/system.slice/docker-{cid}.scope": (9, 0, 0, 0, 0, 0), cid: (0, 1, 1, 1, 1, 1),
               "/user.slice": (0, 0, 0, 2, 0, 0), "/idle.slice": (0, 0, 0, 0, 0, 0)}
    assert [label for label, _c in exporter.top_cgroups(cgroups, 2)] == [f"/system.slice/docker-{cid}.scope", cid]
    samples, _families, _text = scrape(snapshot_of(counters(), cgroups=cgroups), top_cgroups=2)
    assert by_labels(samples, "tcptrace_cgroup_connects_total") == {
        (("cgroup", cid), ("result", "FAILED")): 1, (("cgroup", cid), ("result", "OK")): 1,
        (("cgroup", f"/system.slice/docker-{cid}.scope"), ("result", "FAILED")): 0,
        (("cgroup", f"/system.slice/docker-{cid}.scope"), ("result", "OK")): 0}
    assert by_labels(samples, "tcptrace_cgroup_resets_total")[(("cgroup", cid), ("direction", "received"))] == 1
    assert not any(dict(labels).get("cgroup") == "/user.slice" for _n, labels in samples)
    samples, _families, _text = scrape(snapshot_of(counters(), cgroups=cgroups))
    assert not any(name.startswith("tcptrace_cgroup_") for name, _labels in samples)


def test_cgroup_map_bytes_decode():
    value = exporter.CGROUP_COUNTS.struct.pack(1, 2, 3, 4, 5, 6)
    assert exporter.decode_cgroups([((4242).to_bytes(8, "little"), value)]) == {4242: (1, 2, 3, 4, 5, 6)}
    assert exporter.cgroup_slots(1) == 1024 and exporter.cgroup_slots(1000) == 16000


class DirResolver:
    """workload.Resolver's interface over a directory tree standing for the
    cgroup2 mount: ids are the directories' inodes, as in cgroup v2."""

    def __init__(self, root):
        self.mount = str(root)

    def resolve(self, cgroup_id):
        for top, dirs, _files in os.walk(self.mount):
            for d in dirs:
                path = os.path.join(top, d)
                if os.stat(path).st_ino == cgroup_id:
                    return path[len(self.mount):]
        return None


def test_cgroup_labels_expire(tmp_path):
    cid = "b" * 64
    (tmp_path / "app.slice").mkdir()
    (tmp_path / f"docker-{cid}.scope").mkdir()
    app, box = (os.stat(tmp_path / d).st_ino for d in ("app.slice", f"docker-{cid}.scope"))
    now = [0.0]
    resolver = DirResolver(tmp_path)
    labels = exporter.CgroupLabels(resolver, expiry=60, clock=lambda: now[0])
    counts = {app: (1, 0, 0, 0, 0, 0), box: (2, 0, 0, 0, 0, 0), 999_999_999: (5, 0, 0, 0, 0, 0)}
    assert labels.sort(counts) == ({"/app.slice": (1, 0, 0, 0, 0, 0), cid: (2, 0, 0, 0, 0, 0)}, [])
    # Removed: gone at once (its path was known); never found: gone after the expiry.
    resolved = {app: "/app.slice", box: f"/docker-{cid}.scope"}
    resolver.resolve = lambda cgroup_id: resolved.get(cgroup_id)
    (tmp_path / "app.slice").rmdir()
    now[0] = 59.0
    assert labels.sort(counts) == ({cid: (2, 0, 0, 0, 0, 0)}, [app])
    now[0] = 60.0
    assert labels.sort({box: (2, 0, 0, 0, 0, 0), 999_999_999: (5, 0, 0, 0, 0, 0)}) == (
        {cid: (2, 0, 0, 0, 0, 0)}, [999_999_999])


# -- series known in advance, and drops by reason -------------------------------------


def kernel_context(kernel, btf_offsets=fixed_btf):
    """The DecodeContext and health a run on a saved kernel would have:
    its formats' symbol tables, BTF as given, every tracepoint it has attached."""
    release, opts = kernel_options(kernel)
    plan = runtime.plan(exporter.SPEC, opts, tracefs.FormatSource(os.path.join(FORMATS, kernel)),
                        release=release, btf_offsets=btf_offsets)
    health = dict(HEALTH, tracepoints=[tp.name for tp in exporter.SPEC.tracepoints], attached=list(plan.formats))
    return DecodeContext(symbols=plan.symbols, btf=plan.btf), health


def by_labels(samples, name):
    return {k[1]: v for k, v in samples.items() if k[0] == name}


def test_known_series_are_served_at_zero_from_the_first_scrape():
    ctx, health = kernel_context("6.18")
    samples, _fam, _text = scrape(snapshot_of(counters()), ctx=ctx, health=health)
    moves = by_labels(samples, "tcptrace_tcp_state_transitions_total")
    assert moves == {(("from", a), ("to", b)): 0 for a, b in exporter.TRANSITIONS}
    assert {dict(k)["state"] for k in by_labels(samples, "tcptrace_tcp_retransmits_total")} == \
        set(exporter.RETRANSMIT_STATES)
    assert {dict(k)["result"] for k in by_labels(samples, "tcptrace_tcp_connects_total")} == \
        set(exporter.CONNECT_RESULTS)  # with BTF: the socket's error names the failure
    resets_seen = by_labels(samples, "tcptrace_tcp_resets_total")
    table = tracefs.FormatSource(os.path.join(FORMATS, "6.18")).load("tcp:tcp_send_reset").symbols["reason"]
    assert set(resets_seen) == {(("direction", "sent"), ("reason", n)) for n in table.values() if n != "MAX"} | {
        (("direction", "received"), ("reason", "none"))}
    assert (("direction", "sent"), ("reason", "TCP_ABORT_ON_CLOSE")) in resets_seen
    drops_seen = {dict(k)["reason"] for k in by_labels(samples, "tcptrace_tcp_drops_total")}
    reasons = tracefs.FormatSource(os.path.join(FORMATS, "6.18")).load("skb:kfree_skb").symbols["reason"]
    skip = {n: r for r, n in reasons.items()}["NOT_SPECIFIED"]
    assert drops_seen == {n for r, n in reasons.items() if r > skip and n != "MAX"}
    assert {"NO_SOCKET", "TCP_CSUM", "NETFILTER_DROP"} <= drops_seen and "NOT_SPECIFIED" not in drops_seen
    assert all(v == 0 for (name, _labels), v in samples.items() if name.startswith("tcptrace_tcp_")
               and name.endswith("_total"))


@pytest.mark.parametrize("kernel", KERNELS)
def test_known_series_follow_each_kernel(kernel):
    """Reasons only where the kernel has them; drops only with kfree_skb's reason (5.17+)."""
    try:
        ctx, health = kernel_context(kernel, btf_offsets=no_btf)
    except KernelTooOldError:
        return
    samples, _fam, _text = scrape(snapshot_of(counters()), ctx=ctx, health=health)
    fmt = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    kfree = fmt.load("skb:kfree_skb")
    has_reasons = kfree is not None and kfree.has("reason")
    assert has_reasons == ("skb:kfree_skb" in health["attached"])
    # Without BTF nothing tells a TCP segment apart: no drops, and no error names.
    assert not by_labels(samples, "tcptrace_tcp_drops_total")
    assert {dict(k)["result"] for k in by_labels(samples, "tcptrace_tcp_connects_total")} == \
        set(exporter.CONNECT_RESULTS_NO_BTF)
    send_reset = fmt.load("tcp:tcp_send_reset")
    resets_seen = [dict(k) for k in by_labels(samples, "tcptrace_tcp_resets_total")]
    sent = {r["reason"] for r in resets_seen if r["direction"] == "sent"}
    assert (sent == {"none"}) == (not send_reset.has("reason"))
    ctx, health = kernel_context(kernel)
    samples, _fam, _text = scrape(snapshot_of(counters()), ctx=ctx, health=health)
    assert bool(by_labels(samples, "tcptrace_tcp_drops_total")) == has_reasons
    cong = fmt.load("tcp:tcp_cong_state_set")
    assert bool(by_labels(samples, "tcptrace_tcp_congestion_state_transitions_total")) == (cong is not None)
    assert ("tcp:tcp_probe" in health["attached"]) == (fmt.load("tcp:tcp_probe") is not None)


@pytest.mark.parametrize("kernel", KERNELS)
def test_drop_array_is_sized_from_the_kernels_reason_table(kernel):
    release, opts = kernel_options(kernel)
    try:
        plan = runtime.plan(exporter.SPEC, opts, tracefs.FormatSource(os.path.join(FORMATS, kernel)),
                            release=release, btf_offsets=fixed_btf)
    except KernelTooOldError:
        return
    table = plan.symbols.get("skb:kfree_skb.reason")
    if not table:
        assert not re.search(r"^#define (DROP_REASON_SLOTS \d+|HAVE_KFREE_SKB 1)$", plan.text, re.M)
        return
    slots = int(re.search(r"^#define DROP_REASON_SLOTS (\d+)$", plan.text, re.M).group(1))
    assert max(table) < slots < 2 * max(table) + 2 and slots & (slots - 1) == 0
    skip = {n: r for r, n in table.items()}["NOT_SPECIFIED"]
    assert f"#define DROP_SKIP_UPTO {skip}\n" in plan.text
    assert "int on_kfree_skb(struct tp_kfree_skb *args)" in plan.text


def test_drops_by_the_kernels_reason_names():
    ctx, health = kernel_context("6.18")
    slots = exporter.drop_slots(ctx.symbols)
    names = {n: r for r, n in ctx.symbols["skb:kfree_skb.reason"].items()}

    def cpu(**counts):
        values = [0] * slots
        for name, n in counts.items():
            values[names[name] if name in names else int(name[1:])] = n
        return struct.pack(f"<{slots}Q", *values)

    beyond = [(struct.pack("<I", 0x30001), struct.pack("<Q", 2))]  # a subsystem's reason (openvswitch)
    dropped = exporter.sum_drops([cpu(NO_SOCKET=3, TCP_CSUM=1), cpu(NO_SOCKET=2, r200=4)], slots, beyond)
    assert dropped == {names["NO_SOCKET"]: 5, names["TCP_CSUM"]: 1, 200: 4, 0x30001: 2}
    with pytest.raises(ValueError):
        exporter.sum_drops([cpu()[:-8]], slots)
    snap = exporter.Snapshot(exporter.sum_cpus([counters()]), drops=dropped)
    samples, _fam, _text = scrape(snap, ctx=ctx, health=health)
    got = {dict(k)["reason"]: v for k, v in by_labels(samples, "tcptrace_tcp_drops_total").items()}
    assert got["NO_SOCKET"] == 5 and got["TCP_CSUM"] == 1 and got["NETFILTER_DROP"] == 0
    assert got["200"] == 4 and got[str(0x30001)] == 2  # numbers this kernel's table lacks, as numbers
    assert sum(got.values()) == 12


PROMTOOL = shutil.which("promtool")


def test_exposition_passes_promtool_check_metrics():
    """Prometheus' own linter on a full scrape (names, units, help, types)."""
    if not PROMTOOL:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool (Debian's prometheus package) must be installed in CI")
        pytest.skip("promtool is not installed (make test-deps installs it)")
    ctx, health = kernel_context("6.18")
    full = counters(transitions={7 * 16 + 2: 1}, retransmits={1: 1}, resets_sent={1: 1}, connects_ok=1)
    snap = exporter.Snapshot(exporter.sum_cpus([full]), remotes=[("10.0.0.1", 1, 1)], drops={3: 1})
    _samples, _fam, text = scrape(snap, top_remotes=5, ctx=ctx, health=health)
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr
