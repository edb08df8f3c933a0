"""The workload: cgroup path -> container and pod, the cgroup2 mount, id ->
path resolution, the kernel side's mode from BTF (both sock_cgroup_data
layouts), the filters as map entries, and the generated programs."""

import os
import subprocess

import pytest
from click.testing import CliRunner

from test_btf import Blob
from tcptrace import btf, runtime, tracefs, workload
from tcptrace.cli import cli
from tcptrace.spec import DecodeContext
from tcptrace.tools import TOOLS

ID = "4c01db0b339c" + "a1b2c3d4e5f6" * 4 + "0123"  # 64 hex
UID = "2f0f4f8c-3d2a-4b6e-9a51-8f5e2c7d1a90"


@pytest.mark.parametrize("path,container,pod", [
    (f"/system.slice/docker-{ID}.scope", ID, None),  # docker, systemd driver
    (f"/docker/{ID}", ID, None),  # docker, cgroupfs driver
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
     f"cri-containerd-{ID}.scope", ID, UID),  # containerd CRI, systemd
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{ID}.scope", ID, UID),  # cri-o, guaranteed
    (f"/kubepods/besteffort/pod{UID}/{ID}", ID, UID),  # containerd, cgroupfs
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice",
     None, UID),  # the pod itself (its pause sandbox's parent)
    (f"/machine.slice/libpod-{ID}.scope", ID, None),  # podman, systemd
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container", ID, None),
    (f"/machine.slice/libpod-conmon-{ID}.scope", None, None),  # podman's monitor, not the container
    (f"/system.slice/crio-conmon-{ID}.scope", None, None),
    ("/system.slice/nginx.service", None, None),
    ("/", None, None),
    (None, None, None),
    (f"/system.slice/docker-{ID[:63]}.scope", None, None),  # not 64 hex
    (f"/pod{UID}/x", None, None),  # a pod-like name outside kubepods
])
def test_container_and_pod_from_real_world_paths(path, container, pod):
    assert workload.container_of(path) == (container, pod)


def test_label_is_the_short_id_or_the_paths_tail():
    assert workload.label(f"/docker/{ID}", ID) == ID[:12]
    assert workload.label("/system.slice/nginx.service", None) == "…slice/nginx.service"
    long = "/system.slice/very-long-service-name.service"
    assert workload.label(long, None) == "…" + long[-19:]
    assert workload.label("/a.slice", None) == "/a.slice"
    assert workload.label(None, None) is None


MOUNTINFO = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
"""


def test_cgroup2_mount_on_hybrid_and_unified_and_none(tmp_path):
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(MOUNTINFO)
    assert workload.cgroup2_mount(str(hybrid)) == ("/sys/fs/cgroup/unified", "/")
    unified = tmp_path / "unified"
    unified.write_text("29 23 0:26 /kubepods/pod1 /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n")
    assert workload.cgroup2_mount(str(unified)) == ("/sys/fs/cgroup x", "/kubepods/pod1")
    v1 = tmp_path / "v1"
    v1.write_text(MOUNTINFO.replace("cgroup2 cgroup2", "cgroup cgroup"))
    assert workload.cgroup2_mount(str(v1)) is None
    assert workload.cgroup2_mount(str(tmp_path / "absent")) is None


def fake_hierarchy(tmp_path, root="/"):
    mount = tmp_path / "cg"
    (mount / "system.slice" / "nginx.service").mkdir(parents=True)
    (mount / "system.slice" / f"docker-{ID}.scope").mkdir()
    (mount / "cgroup.procs").write_text("")  # files are not cgroups
    info = tmp_path / "mountinfo"
    info.write_text(f"32 31 0:27 {root} {mount} rw - cgroup2 cgroup2 rw\n")
    return mount, str(info)


def test_parse_cgroup_takes_a_directory_or_the_path_the_rows_show(tmp_path):
    mount, info = fake_hierarchy(tmp_path)
    nginx = mount / "system.slice" / "nginx.service"
    expected = workload.Cgroup(str(nginx), os.stat(nginx).st_ino, 2)
    assert workload.parse_cgroup(str(nginx), info) == expected
    assert workload.parse_cgroup("/system.slice/nginx.service", info) == expected
    assert workload.parse_cgroup(str(mount), info).level == 0
    for bad in ("/nope", str(tmp_path), str(mount / "cgroup.procs"), "../../etc"):
        with pytest.raises(ValueError, match="not a directory of the cgroup v2 hierarchy"):
            workload.parse_cgroup(bad, info)
    # Inside a cgroup namespace the mount's root is not the hierarchy's: levels count from the top.
    _mount, nested = fake_hierarchy(tmp_path / "ns", root="/kubepods/pod1")
    assert workload.parse_cgroup("/system.slice", nested).level == 3


def test_without_cgroup2_the_sentence_names_the_fix(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.replace("cgroup2 cgroup2", "cgroup cgroup"))
    with pytest.raises(workload.NoCgroup2, match="no cgroup v2 hierarchy mounted"):
        workload.parse_cgroup("/sys/fs/cgroup/unified", str(info))


def test_parse_netns_checks_the_namespace_kind():
    assert workload.parse_netns("/proc/self/ns/net") == os.stat("/proc/self/ns/net").st_ino
    with pytest.raises(ValueError, match="not of a network namespace"):
        workload.parse_netns("/proc/self/ns/uts")
    with pytest.raises(ValueError, match="not a namespace file"):
        workload.parse_netns("/proc/self/status")
    with pytest.raises(ValueError, match="cannot open"):
        workload.parse_netns("/run/netns/no-such-namespace")


def test_resolver_finds_cgroups_made_later_and_forgets_gone_ones(tmp_path):
    mount, info = fake_hierarchy(tmp_path)
    now = [0.0]
    resolver = workload.Resolver(info, clock=lambda: now[0])
    table = resolver.info
    nginx = os.stat(mount / "system.slice" / "nginx.service").st_ino
    docker = os.stat(mount / "system.slice" / f"docker-{ID}.scope").st_ino
    assert table[nginx] == ("/system.slice/nginx.service", None, None, "…slice/nginx.service")
    assert table[docker] == (f"/system.slice/docker-{ID}.scope", ID, None, ID[:12])
    scans = resolver.scans
    later = mount / "later.slice"
    later.mkdir()  # after the resolver's first walk
    assert table[os.stat(later).st_ino][0] == "/later.slice"  # found by a rescan on the miss
    assert resolver.scans == scans  # the walk found it before finishing its pass
    assert table[0] == workload.UNKNOWN
    gone = 987654321
    assert table[gone] == workload.UNKNOWN
    walked = resolver.scans
    assert table[gone] == workload.UNKNOWN and resolver.scans == walked  # no new walk before `retry`
    now[0] += resolver.retry
    table[gone]
    assert resolver.scans == walked + 1


def test_resolver_without_cgroup2(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("")
    resolver = workload.Resolver(str(info))
    assert resolver.info[44] == workload.UNKNOWN


def test_row_without_a_resolver_is_ids_only():
    ctx = DecodeContext()
    assert workload.row(ctx, 44, 4026531840) == (None, 44, None, None, None, 4026531840)
    assert workload.row(ctx, 0, 0) == (None, None, None, None, None, None)


# -- the kernel side's mode, from BTF ------------------------------------------------

def sock_btf(new_layout, ancestors="ancestors", old_kernfs=False):
    """struct sock, sock_cgroup_data (5.15+: a cgroup pointer; before: a u64
    `val` in an anonymous union with the net_cls/net_prio bitfields),
    cgroup, kernfs_node, sock_common, net, ns_common."""
    b = Blob()
    u8, u16, u32, u64 = (b.int_(n, s) for n, s in (("u8", 1), ("u16", 2), ("u32", 4), ("u64", 8)))
    int_ = b.int_("int", 4, signed=True)
    cgroup_fwd = b.add("cgroup", btf.KIND_FWD, 0, 0)
    ptr = b.add("", btf.KIND_PTR, 0, cgroup_fwd)
    if new_layout:
        cgrp_data = b.composite(btf.KIND_STRUCT, "sock_cgroup_data", 16,
                                [("cgroup", ptr, 0, 0), ("classid", u32, 64, 0), ("prioidx", u16, 96, 0)])
    else:
        bits = b.composite(btf.KIND_STRUCT, "", 8, [("is_data", u8, 0, 1), ("no_refcnt", u8, 1, 1),
                                                   ("unused", u8, 2, 6), ("padding", u8, 8, 0),
                                                   ("prioidx", u16, 16, 0), ("classid", u32, 32, 0)],
                           kind_flag=True)
        union = b.composite(btf.KIND_UNION, "", 8, [("", bits, 0, 0), ("val", u64, 0, 0)])
        cgrp_data = b.composite(btf.KIND_STRUCT, "sock_cgroup_data", 8, [("", union, 0, 0)])
    b.composite(btf.KIND_STRUCT, "sock", 800, [("sk_cgrp_data", cgrp_data, 672 * 8, 0)])
    flex = b.add("", btf.KIND_ARRAY, 0, 0, (ptr if ancestors == "ancestors" else u64).to_bytes(4, "little")
                 + u32.to_bytes(4, "little") + (0).to_bytes(4, "little"))
    members = [("kn", ptr, 256 * 8, 0), ("level", int_, 216 * 8, 0), (ancestors, flex, 2224 * 8, 0)]
    if old_kernfs:
        members.append(("id", int_, 200 * 8, 0))
    b.composite(btf.KIND_STRUCT, "cgroup", 2232, members)
    b.composite(btf.KIND_STRUCT, "kernfs_node", 128, [("id", u64, 96 * 8, 0)])
    b.composite(btf.KIND_STRUCT, "sock_common", 136, [("skc_state", u8, 18 * 8, 0), ("skc_net", ptr, 48 * 8, 0)])
    ns = b.composite(btf.KIND_STRUCT, "ns_common", 40, [("inum", u32, 24 * 8, 0)])
    b.composite(btf.KIND_STRUCT, "net", 400, [("ns", ns, 152 * 8, 0)])
    return btf.BTF(b.bytes())


def found_in(parsed):
    found = {}
    for struct_name, members in workload.BTF.items():
        for member, where in btf.struct_offsets(parsed, struct_name, members).items():
            found[f"{struct_name}.{member}"] = where
    return found


@pytest.mark.parametrize("new,ancestors,old_kernfs,defines,member", [
    (True, "ancestors", False, {"WORKLOAD_SOCKET_CGROUP", "WORKLOAD_ANCESTORS"}, "cgroup"),  # 6.0+
    (False, "ancestor_ids", False, {"WORKLOAD_SOCKET_CGROUP", "WORKLOAD_ANCESTORS"}, "val"),  # 5.5 to 5.14
    (False, "ancestor_ids", True, {"WORKLOAD_SOCKET_CGROUP", "WORKLOAD_ID_BITS32"}, "val"),  # before 5.5
], ids=["5.15+", "pre-5.15", "pre-5.5"])
def test_both_sock_cgroup_data_layouts(new, ancestors, old_kernfs, defines, member):
    found = found_in(sock_btf(new, ancestors, old_kernfs))
    assert found[f"sock_cgroup_data.{member}"] == (0, 8)
    assert found["sock.sk_cgrp_data"][0] == 672
    other = "val" if member == "cgroup" else "cgroup"
    assert f"sock_cgroup_data.{other}" not in found
    defs, how = workload.mode(found)
    assert set(defs) == defines
    assert ("5.15+" if new else "pre-5.15") in how
    assert "netns from sock_common.skc_net" in how


def test_fallback_without_the_members():
    defs, how = workload.mode({"sock_common.skc_net": (48, 8)})
    assert defs == {"WORKLOAD_OWNER_CGROUP": 1}
    assert "fallback" in how and "netns unknown" in how
    # A kernfs id of another width is never read as a u64.
    found = found_in(sock_btf(True))
    found["kernfs_node.id"] = (96, 4)
    assert "WORKLOAD_OWNER_CGROUP" in workload.mode(found)[0]


def test_filters_become_levels_or_descendants(tmp_path):
    mount, _info = fake_hierarchy(tmp_path)
    slice_ = workload.Cgroup(str(mount / "system.slice"), 7, 1)
    deep = workload.Cgroup(str(mount / "system.slice" / "nginx.service"), 9, 2)
    defs, maps = workload.filter_settings((slice_, deep), (4026531840,), {"WORKLOAD_ANCESTORS": 1})
    assert defs == {"FILTER_CGROUPS": 1, "FILTER_CGROUP_LEVELS": 0b110, "FILTER_NETNS": 1}
    assert maps == {"filter_cgroups": [(7, 1), (9, 1)], "filter_netns": [(4026531840, 1)]}
    defs, maps = workload.filter_settings((slice_,), (), {"WORKLOAD_OWNER_CGROUP": 1})
    below = {os.stat(p).st_ino for p in (mount / "system.slice" / "nginx.service",
                                         mount / "system.slice" / f"docker-{ID}.scope")}
    assert defs == {"FILTER_CGROUPS": 1}
    assert {k for k, _ in maps["filter_cgroups"]} == {7} | below


# -- generated programs ------------------------------------------------------

FORMATS = os.path.join(os.path.dirname(__file__), "data", "formats")
KERNELS = sorted(d for d in os.listdir(FORMATS) if os.path.isdir(os.path.join(FORMATS, d)))
EVENT_TOOLS = [s for s in TOOLS.values() if "cgroup_id" in s.event.names]


def preprocess(text):
    """What the C preprocessor keeps of a program (no bcc needed)."""
    return subprocess.run(["cpp", "-P", "-w"], input=text, capture_output=True, text=True, check=True).stdout


def btf_of(parsed):
    def offsets(struct_name, members):
        return btf.struct_offsets(parsed, struct_name, members)
    return offsets


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("spec", EVENT_TOOLS, ids=[s.name for s in EVENT_TOOLS])
def test_every_tool_reads_the_workload_on_saved_kernels(spec, kernel, tmp_path):
    source = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    cg = workload.Cgroup(str(tmp_path), 77, 2)
    opts = runtime.RunOptions(cgroups=(cg,), netns=(4026531840,))
    for parsed, word in ((sock_btf(True), "OFF_SOCK_CGROUP_DATA_CGROUP"), (sock_btf(False, "ancestor_ids"),
                                                                           "OFF_SOCK_CGROUP_DATA_VAL")):
        try:
            plan = runtime.plan(spec, opts, source, release=kernel, btf_offsets=btf_of(parsed))
        except Exception as e:  # a tool this kernel cannot run at all
            assert "Linux" in str(e) or "kernel" in str(e)
            return
        text = plan.text
        assert f"#define {word} 0" in text and "#define FILTER_CGROUP_LEVELS 4" in text
        assert plan.maps["filter_cgroups"] == [(77, 1)] and plan.maps["filter_netns"] == [(4026531840, 1)]
        if not shutil_which("cpp"):
            continue
        code = preprocess(text)
        assert "workload_read" in code and "filter_cgroups" in code and "filter_netns" in code
        assert ("word & 3" in code) == (word.endswith("VAL"))
        assert "sock_cgroups" not in code  # no fallback map when the socket's cgroup is read


def shutil_which(name):
    import shutil

    return shutil.which(name)


def test_fallback_program_records_the_owners_cgroup():
    spec = TOOLS["states"]
    source = tracefs.FormatSource(os.path.join(FORMATS, "6.1"))
    plan = runtime.plan(spec, runtime.RunOptions(), source, release="6.1", btf_offsets=lambda s, m: {})
    assert "#define WORKLOAD_OWNER_CGROUP 1" in plan.text
    if shutil_which("cpp"):
        code = preprocess(plan.text)
        assert "bpf_get_current_cgroup_id" in code and "sock_cgroups" in code


def test_netns_filter_needs_btf():
    spec = TOOLS["life"]
    source = tracefs.FormatSource(os.path.join(FORMATS, "6.1"))
    with pytest.raises(Exception, match="--netns needs the kernel's BTF"):
        runtime.plan(spec, runtime.RunOptions(netns=(1,)), source, release="6.1", btf_offsets=lambda s, m: None)


@pytest.mark.parametrize("spec", EVENT_TOOLS, ids=[s.name for s in EVENT_TOOLS])
def test_every_event_tool_takes_the_workload_options(spec):
    result = CliRunner().invoke(cli, [spec.name, "--help"])
    for flag in ("--cgroup", "--netns", "--show-cgroup"):
        assert flag in result.output
    keys = [c.key for c in spec.columns if c.json]
    assert keys[-5:] == ["cgroup_id", "cgroup", "container", "pod_uid", "netns"]


@pytest.mark.parametrize("args,message", [
    (["life", "--cgroup", "/no/such/cgroup", "--ebpf"], "is not a directory of the cgroup v2 hierarchy"),
    (["states", "--netns", "/proc/self/ns/uts", "--ebpf"], "not of a network namespace"),
])
def test_bad_paths_are_usage_errors_before_anything(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output


def test_show_cgroup_table_derived_path_matches_decode(tmp_path):
    import io

    from events import make_event
    from tcptrace import output
    from tcptrace.spec import show_cgroup

    mount, info = fake_hierarchy(tmp_path)
    ctx = DecodeContext(workload=workload.Resolver(info))
    docker = os.stat(mount / "system.slice" / f"docker-{ID}.scope").st_ino
    nginx = os.stat(mount / "system.slice" / "nginx.service").st_ino
    spec = TOOLS["states"]
    events = [make_event(spec, ts_ns=1, family=2, lport=80, rport=5000, oldstate=1, newstate=8, cgroup_id=cg,
                         netns=4026531840, comm=b"nginx") for cg in (docker, nginx, 0)]
    texts = []
    for derived in (True, False):
        w = output.writer("table", io.StringIO(), show_cgroup(spec.columns))
        path = output.batch_for(spec, w) if derived else w.batch
        assert path(events, spec.decode, ctx) == (3, 0)
        texts.append(w.stream.getvalue())
    assert texts[0] == texts[1]
    lines = texts[0].splitlines()
    assert [line[:21] for line in lines] == [ID[:12].ljust(21), "…slice/nginx.service ", "-".ljust(21)]
