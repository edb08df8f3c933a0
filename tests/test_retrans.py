"""tcptrace retrans without the kernel: decoding, owners from a /proc tree,
every output format, the count key, code generation for each saved kernel's
formats, and the command line."""

import io
import json
import os
import re
import shutil
import socket
import subprocess

import pytest
from click.testing import CliRunner

from events import make_event
from helpers import unwrap
from tcptrace import codegen, output, procfs, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.spec import DecodeContext
from tcptrace.tools import retrans

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")

V4 = socket.inet_pton(socket.AF_INET, "10.1.2.3") + bytes(12)
V4R = socket.inet_pton(socket.AF_INET, "93.184.216.34") + bytes(12)
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
V6R = socket.inet_pton(socket.AF_INET6, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe")
ALL = retrans.OWNER_KNOWN | retrans.STATE_KNOWN | retrans.ERR_KNOWN


def event(**kw):
    base = dict(ts_ns=5_000_000_000, pid=22384, state=1, err=0, family=2, lport=22, rport=34619,
                type=retrans.RETRANS, flags=ALL, saddr=V4, daddr=V4R, comm=b"sshd".ljust(16, b"\0"))
    base.update(kw)
    return make_event(retrans.SPEC, **base)


def decode(ev, owners=None):
    return retrans.decode(ev, DecodeContext(owners=owners))


def as_json(row):
    return {c.key: v for c, v in zip(retrans.COLUMNS, row) if c.json}


def render(kind, events, owners=None, **kw):
    stream = io.StringIO()
    kw.setdefault("show_time", True)
    w = output.writer(kind, stream, retrans.COLUMNS, **kw)
    w.header()
    for ev in events:
        w.row(ev[0], decode(ev, owners))
    return stream.getvalue()


# -- decode ------------------------------------------------------------------

DECODE_CASES = [
    ("v4 retransmit, everything known", {},
     {"pid": 22384, "comm": "sshd", "family": 4, "laddr": "10.1.2.3", "lport": 22, "raddr": "93.184.216.34",
      "rport": 34619, "state": "ESTABLISHED", "type": "retrans", "err": 0}),
    ("v6 SYN-ACK", dict(family=10, saddr=V6, daddr=V6R, type=retrans.SYNACK, state=3,
                        flags=retrans.OWNER_KNOWN | retrans.STATE_KNOWN, lport=443, rport=50000),
     {"pid": 22384, "comm": "sshd", "family": 6, "laddr": "2001:db8::1", "lport": 443,
      "raddr": "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", "rport": 50000, "state": "SYN_RECV",
      "type": "synack", "err": None}),
    ("kernel without state or err (4.19)", dict(flags=retrans.OWNER_KNOWN, state=0, err=0),
     {"state": None, "err": None, "pid": 22384}),
    ("owner unknown, no /proc to ask", dict(flags=retrans.STATE_KNOWN, pid=0, comm=bytes(16)),
     {"pid": None, "comm": None, "state": "ESTABLISHED"}),
    ("every state by name", dict(state=11), {"state": "CLOSING"}),
    ("a state a later kernel may add", dict(state=13), {"state": "13"}),
    ("a failed attempt (--failed)", dict(err=-16), {"err": -16}),
    ("a type a later program may add", dict(type=9), {"type": "9"}),
]


@pytest.mark.parametrize("what,fields,expected", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode(what, fields, expected):
    got = as_json(decode(event(**fields)))
    for key, value in expected.items():
        assert got[key] == value, key


def test_decode_table_only_columns():
    row = decode(event())
    cells = {c.header: v for c, v in zip(retrans.COLUMNS, row) if c.table}
    assert cells == {"PID": 22384, "IP": 4, "LADDR:LPORT": "10.1.2.3:22", "T>": "R>",
                     "RADDR:RPORT": "93.184.216.34:34619", "STATE": "ESTABLISHED"}
    v6 = decode(event(family=10, saddr=V6, daddr=V6R, type=retrans.SYNACK))
    cells = {c.header: v for c, v in zip(retrans.COLUMNS, v6) if c.table}
    assert cells["LADDR:LPORT"] == "[2001:db8::1]:22" and cells["T>"] == "S>"
    assert cells["RADDR:RPORT"] == "[2001:db8:ffff:ffff:ffff:ffff:ffff:fffe]:34619"


# -- owners of sockets opened before tracing, from a /proc tree ----------------

def _hex4(addr):
    return socket.inet_pton(socket.AF_INET, addr)[::-1].hex().upper()


def fake_proc(tmp_path, sockets, processes):
    """A /proc with net/tcp (IPv4 lines: laddr, lport, raddr, rport, state,
    inode) and processes {pid: (comm, [inodes])}."""
    net = tmp_path / "net"
    net.mkdir()
    lines = ["  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"]
    for i, (la, lp, ra, rp, st, inode) in enumerate(sockets):
        lines.append(f"{i:4d}: {_hex4(la)}:{lp:04X} {_hex4(ra)}:{rp:04X} {st:02X} 00000000:00000000 "
                     f"00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0")
    (net / "tcp").write_text("\n".join(lines) + "\n")
    (net / "tcp6").write_text(lines[0] + "\n")
    for pid, (comm, inodes) in processes.items():
        fd = tmp_path / str(pid) / "fd"
        fd.mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        for n, inode in enumerate(inodes):
            os.symlink(f"socket:[{inode}]", fd / str(n + 3))
    return str(tmp_path)


def test_owner_from_proc_for_a_connection_and_a_listener(tmp_path):
    proc = fake_proc(
        tmp_path,
        sockets=[("10.1.2.3", 22, "93.184.216.34", 34619, 1, 5001),
                 ("0.0.0.0", 443, "0.0.0.0", 0, 10, 5002),
                 ("10.1.2.3", 8080, "0.0.0.0", 0, 10, 5003)],
        processes={700: ("sshd", [5001]), 800: ("nginx", [5002]), 900: ("java", [5003])},
    )
    owners = procfs.OwnerResolver(proc)
    unknown = dict(flags=retrans.STATE_KNOWN, pid=0, comm=bytes(16))
    row = as_json(decode(event(**unknown), owners))
    assert (row["pid"], row["comm"]) == (700, "sshd")
    # A SYN-ACK's owner is its listener's: on any address, or on the one it was sent from.
    row = as_json(decode(event(**unknown, type=retrans.SYNACK, lport=443, rport=50000), owners))
    assert (row["pid"], row["comm"]) == (800, "nginx")
    row = as_json(decode(event(**unknown, type=retrans.SYNACK, lport=8080, rport=50000), owners))
    assert (row["pid"], row["comm"]) == (900, "java")
    # A connection's own 4-tuple, not its local port, names its owner.
    row = as_json(decode(event(**unknown, lport=443), owners))
    assert row["pid"] is None and row["comm"] is None
    # What the kernel knows wins over /proc.
    assert as_json(decode(event(), owners))["pid"] == 22384
    assert procfs.listener_owners(proc) == {443: (800, "nginx"), 8080: (900, "java")}


def test_owner_lookups_share_one_read_of_proc_per_refresh(tmp_path, monkeypatch):
    proc = fake_proc(tmp_path, sockets=[("10.1.2.3", 22, "10.9.9.9", 40000 + i, 1, 6000 + i) for i in range(3)],
                     processes={700: ("sshd", [6000, 6001, 6002])})
    reads = []
    real = procfs.socket_inodes
    monkeypatch.setattr(procfs, "socket_inodes", lambda p: reads.append(p) or real(p))
    now = [100.0]
    owners = procfs.OwnerResolver(proc, refresh=1.0, clock=lambda: now[0])
    for i in range(3):
        assert owners.lookup(socket.AF_INET, "10.1.2.3", 22, "10.9.9.9", 40000 + i) == (700, "sshd")
    assert owners.lookup(socket.AF_INET, "10.1.2.3", 22, "10.9.9.9", 1) is None
    assert len(reads) == 1
    now[0] += 1.5  # a socket unknown then is looked up in a fresh snapshot
    assert owners.lookup(socket.AF_INET, "10.1.2.3", 22, "10.9.9.9", 2) is None
    assert len(reads) == 2


def test_listeners_from_sock_diag_are_those_of_proc_net_tcp():
    """The machine's own listeners come from sock_diag; /proc/net/tcp, which
    the fake /proc above exercises, must say the same."""
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::1", 0))
        for s in (v4, v6):
            s.listen()
        mine = {s.getsockname()[1]: os.fstat(s.fileno()).st_ino for s in (v4, v6)}
        diag = procfs._diag_listeners()
        assert {port: diag.get(port) for port in mine} == mine
        listed = procfs._proc_listeners("/proc")  # other listeners may come and go meanwhile
        assert {port: listed.get(port) for port in mine} == mine
        owners = procfs.listener_owners()
        with open(f"/proc/{os.getpid()}/comm") as f:
            comm = f.read().strip()
        assert {port: owners.get(port) for port in mine} == {port: (os.getpid(), comm) for port in mine}


# -- every output format -------------------------------------------------------

def test_table_golden():
    text = render("table", [event(), event(type=retrans.SYNACK, state=3, flags=retrans.STATE_KNOWN, pid=0,
                                           lport=443, rport=50000)])
    lines = text.splitlines()
    assert lines[0] == "TIME     PID     IP LADDR:LPORT           T> RADDR:RPORT           STATE"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", lines[1][:8])
    assert lines[1][9:] == "22384   4  10.1.2.3:22           R> 93.184.216.34:34619   ESTABLISHED"
    assert lines[2][9:] == "-       4  10.1.2.3:443          S> 93.184.216.34:50000   SYN_RECV"
    assert max(len(l) for l in lines) <= 80


def test_table_wide_keeps_ipv6_aligned():
    text = render("table", [event(family=10, saddr=V6, daddr=V6R, state=0, flags=retrans.OWNER_KNOWN)],
                  wide=True, show_time=False)
    header, row = text.splitlines()
    assert header.split() == ["PID", "IP", "LADDR:LPORT", "T>", "RADDR:RPORT", "STATE"]
    assert row.split() == ["22384", "6", "[2001:db8::1]:22", "R>", "[2001:db8:ffff:ffff:ffff:ffff:ffff:fffe]:34619",
                           "-"]
    assert row.index("R>") == header.index("T>") and row.index("[2001:db8:ffff") == header.index("RADDR")


def test_csv_golden():
    lines = render("csv", [event(comm=b'a,"b"\0'), event(flags=0, pid=0)], show_time=False).splitlines()
    assert lines == [
        "pid,comm,family,laddr,lport,raddr,rport,state,type,err,cgroup_id,cgroup,container,pod_uid,netns",
        '22384,"a,""b""",4,10.1.2.3,22,93.184.216.34,34619,ESTABLISHED,retrans,0,,,,,',
        ",,4,10.1.2.3,22,93.184.216.34,34619,,retrans,,,,,,",
    ]


def test_json_golden():
    text = render("json", [event(type=retrans.SYNACK, state=3, flags=retrans.OWNER_KNOWN | retrans.STATE_KNOWN)])
    got = unwrap(json.loads(text))
    assert re.fullmatch(r"\d\d:\d\d:\d\d", got.pop("time"))
    assert got == {"pid": 22384, "comm": "sshd", "family": 4, "laddr": "10.1.2.3", "lport": 22,
                   "raddr": "93.184.216.34", "rport": 34619, "state": "SYN_RECV", "type": "synack", "err": None,
                   "cgroup_id": None, "cgroup": None, "container": None, "pod_uid": None, "netns": None}


# -- the count key ---------------------------------------------------------------

def test_flags_and_types_are_the_programs():
    source = codegen.bpf_source(retrans.SPEC.bpf)
    # The flags and type values the program sets are the ones decode() reads.
    for name, value in (("TYPE_RETRANS", retrans.RETRANS), ("TYPE_SYNACK", retrans.SYNACK),
                        ("F_OWNER", retrans.OWNER_KNOWN), ("F_STATE", retrans.STATE_KNOWN),
                        ("F_ERR", retrans.ERR_KNOWN)):
        assert re.search(rf"^#define {name} {value}$", source, re.M), name


def test_count_rows():
    key = make_event(retrans.COUNT_KEY, saddr=V6, daddr=V6R, family=10, lport=443, rport=50000,
                     type=retrans.SYNACK)
    assert retrans.decode_count(key, DecodeContext()) == (6, "2001:db8::1", 443,
                                                          "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", 50000, "synack")
    rows = [retrans.decode_count((V4, V4R, 2, 22, 34619, retrans.RETRANS), DecodeContext()) + (31,)]
    columns = list(retrans.COUNT_COLUMNS) + [output.Column("count", "COUNT", 8, "d", right=True)]
    for kind, expected in (
        ("table", ["IP    LADDR     LPORT    RADDR          RPORT    TYPE     COUNT",
                   "4     10.1.2.3  22       93.184.216.34  34619    retrans  31"]),
        ("json", ['{"family":4,"laddr":"10.1.2.3","lport":22,"raddr":"93.184.216.34","rport":34619,'
                  '"type":"retrans","count":31}']),
        ("csv", ["family,laddr,lport,raddr,rport,type,count", "4,10.1.2.3,22,93.184.216.34,34619,retrans,31"]),
    ):
        stream = io.StringIO()
        output.writer(kind, stream, retrans.COLUMNS).summary(columns, rows)
        if kind == "json":  # the envelope first, then the row as expected
            head, _, body = stream.getvalue().partition(',"schema":1,')
            assert head.startswith('{"ts":"') and '"ts_mono":' in head
            stream = io.StringIO("{" + body)
        assert [l.rstrip() for l in stream.getvalue().splitlines()] == [l.rstrip() for l in expected], kind


# -- code generation for each kernel's formats -----------------------------------

# kernel -> (state field, family field, err field) in its tcp_retransmit_skb
KERNELS = {
    "4.19": (False, False, False),
    "5.4": (True, False, False),
    "5.10": (True, False, False),
    "5.15": (True, True, False),
    "6.1": (True, True, False),
    "6.8": (True, True, False),
    "6.18": (True, True, True),
}


def plan_for(kernel, **opts):
    source = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    return runtime.plan(retrans.SPEC, runtime.RunOptions(**opts), source, release=kernel)


def preprocess(text):
    """The program after the C preprocessor: which #if branches this kernel's
    formats select. bcc's map macros stay as they are."""
    cpp = shutil.which("cpp")
    if not cpp:
        pytest.skip("no C preprocessor (cpp) to check which branches the program takes")
    result = subprocess.run([cpp, "-P", "-w", "-"], input=text, capture_output=True, text=True)
    return result


def function(text, name):
    start = re.search(rf"^.*\b{name}\(", text, re.M).start()
    end = text.index("\n}\n", start)
    return text[start:end]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_program_adapts_to_the_kernels_fields(kernel):
    has_state, has_family, has_err = KERNELS[kernel]
    plan = plan_for(kernel)
    assert set(plan.formats) == {"tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack", "sock:inet_sock_set_state"}
    result = preprocess(plan.text)
    assert result.returncode == 0, result.stderr
    skb = function(result.stdout, "on_tcp_retransmit_skb")
    assert ("args->state" in skb) == has_state
    assert ("args->family" in skb) == has_family
    assert ("unmap_v4((&ev)->saddr, (&ev)->daddr)" in skb) == (not has_family)
    assert ("args->err" in skb) == has_err
    synack = function(result.stdout, "on_tcp_retransmit_synack")
    assert ("args->family" in synack) == has_family
    assert "listen_owners.lookup(&lport)" in synack
    assert "track_owner(skaddr" in function(result.stdout, "on_inet_sock_set_state")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_failed_attempts_need_the_err_field(kernel):
    result = preprocess(plan_for(kernel, extra={"FILTER_FAILED": 1}).text)
    if KERNELS[kernel][2]:
        assert result.returncode == 0, result.stderr
        skb = function(result.stdout, "on_tcp_retransmit_skb")
        assert "if (ev.err == 0)" in skb and "if (ev.err != 0)" not in skb
        assert function(result.stdout, "on_tcp_retransmit_synack").split("{", 1)[1].split() == ["return", "0;"]
    else:
        assert result.returncode != 0
        assert "--failed needs the err field of tcp:tcp_retransmit_skb" in result.stderr


def test_filters_and_count_mode_reach_the_program():
    text = plan_for("6.18", count=True, pids=(1,), lports=(443,), family=10).text
    for line in ("#define TCPTRACE_COUNT 1", "#define FILTER_PIDS 1", "#define FILTER_LPORTS 1",
                 "#define FILTER_FAMILY 10", "#define TCPTRACE_OWNERS 1"):
        assert line in text
    result = preprocess(text)
    assert result.returncode == 0, result.stderr
    assert "count_event(&key);" in result.stdout and ".atomic_increment(" not in result.stdout
    assert "emit(ctx" not in function(result.stdout, "report")
    assert "return owner_known(o) && pid_ok(o->pid);" in result.stdout


def test_runs_without_the_optional_tracepoints():
    source = tracefs.FormatSource(os.path.join(FORMATS, "6.18"),
                                  hidden=("tcp:tcp_retransmit_synack", "sock:inet_sock_set_state"))
    plan = runtime.plan(retrans.SPEC, runtime.RunOptions(), source, release="6.18")
    assert {tp.name for tp, _ in plan.missing} == {"tcp:tcp_retransmit_synack", "sock:inet_sock_set_state"}
    result = preprocess(plan.text)
    assert result.returncode == 0, result.stderr
    assert "on_tcp_retransmit_skb" in result.stdout
    assert "on_tcp_retransmit_synack" not in result.stdout and "on_inet_sock_set_state" not in result.stdout


def test_ebpf_needs_no_root():
    result = CliRunner().invoke(cli, ["retrans", "--ebpf", "--formats", os.path.join(FORMATS, "4.19")])
    assert result.exit_code == 0, result.output
    assert "int on_tcp_retransmit_skb(struct tp_tcp_retransmit_skb *args)" in result.output
    assert "HAS_TCP_RETRANSMIT_SKB_STATE" not in result.output.split("retrans.bpf.c")[0]


# -- command line ------------------------------------------------------------------

BAD_COMMAND_LINES = [
    (["-i", "1"], "-i/--interval goes with -c/--count"),
    (["--top", "3"], "--top goes with -c/--count"),
    (["-4", "-6"], "-4/--ipv4 and -6/--ipv6 exclude each other"),
    (["-c", "-i", "0"], "-i"),
    (["-c", "--top", "0"], "--top"),
    (["-L", "0"], "-L"),
    (["-D", "65536"], "-D"),
    (["-p", "4194303"], "no process has PID 4194303"),
    (["-l"], "No such option"),  # bcc's tail loss probes: not without a kprobe
]


@pytest.mark.parametrize("args,message", BAD_COMMAND_LINES, ids=[" ".join(a) for a, _ in BAD_COMMAND_LINES])
def test_bad_command_lines(args, message):
    result = CliRunner().invoke(cli, ["retrans", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_help_names_what_needs_a_kprobe():
    result = CliRunner().invoke(cli, ["retrans", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Tail loss probes" in text and "kprobe" in text
    for example in retrans.SPEC.examples:
        assert example.command in result.output


def test_time_column_is_always_there():
    """bcc's tcpretrans always prints TIME; -T changes nothing, -t adds TIME(s)."""
    from tcptrace import cli as cli_module

    import click

    cmd = cli.commands["retrans"]
    for args, time, timestamp in (([], True, False), (["-T"], True, False), (["-t"], True, True)):
        with click.Context(cmd) as ctx:
            params = cmd.make_context("retrans", list(args), parent=ctx).params
        opts = cli_module._options(params, retrans.SPEC)
        assert (opts.time, opts.timestamp) == (time, timestamp)
