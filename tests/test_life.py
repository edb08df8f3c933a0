"""tcptrace life without the kernel: decoding, every output format, the
event struct against the C program, code generation for saved kernels'
formats, and the command line."""

import io
import json
import os
import socket

import pytest
from click.testing import CliRunner

from events import make_event
from helpers import unwrap
from tcptrace import output, runtime, tracefs, workload
from tcptrace.cli import cli
from tcptrace.spec import DecodeContext
from tcptrace.tools import life

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")
BTF_OFFSETS = {"bytes_acked": (1824, 8), "bytes_received": (1752, 8)}

V4 = socket.inet_pton(socket.AF_INET, "10.0.0.7") + bytes(12)
V4R = socket.inet_pton(socket.AF_INET, "93.184.216.34") + bytes(12)
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
V6R = socket.inet_pton(socket.AF_INET6, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe")


def event(**kw):
    base = dict(ts_ns=9_000_000_000, span_ns=1_234_567, connect_ns=45_600, tx_bytes=100_002, rx_bytes=5_001,
                pid=22597, retransmits=3, family=2, lport=46644, rport=443, partial=0, bytes_known=1,
                connect_known=1, retrans_known=1, closer=1, saddr=V4, daddr=V4R,
                comm=b"curl".ljust(16, b"\0"), cgroup_id=44, netns=4026531840)
    base.update(kw)
    return make_event(life.SPEC, **base)


def decode(ev, **ctx):
    return life.decode(ev, DecodeContext(**ctx))


def as_dict(row):
    return {c.key: v for c, v in zip(life.COLUMNS, row)}


def render(kind, events, **kw):
    stream = io.StringIO()
    w = output.writer(kind, stream, life.COLUMNS, **kw)
    w.header()
    for ev in events:
        w.row(ev[0], decode(ev, wide=kw.get("wide", False), extended=kw.get("extended", False)))
    return stream.getvalue()


# -- decode ------------------------------------------------------------------

EVERYTHING = {
    "pid": 22597, "comm": "curl", "family": 4, "laddr": "10.0.0.7", "lport": 46644, "raddr": "93.184.216.34",
    "rport": 443, "tx_kb": 97, "rx_kb": 4, "tx_bytes": 100_002, "rx_bytes": 5_001, "retransmits": 3,
    "closed_by": "local", "connect_ms": 0.0456, "ms": 1.234567, "partial": False, "ms_text": "1.23",
    "cgroup_label": None, "cgroup_id": 44, "cgroup": None, "container": None, "pod_uid": None, "netns": 4026531840,
}

DECODE_CASES = [
    ("v4, everything known", {}, EVERYTHING),
    ("v6", dict(family=10, saddr=V6, daddr=V6R),
     {"family": 6, "laddr": "2001:db8::1", "raddr": "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe"}),
    ("opened before tracing", dict(partial=1, connect_known=0, span_ns=2_500_000_000),
     {"partial": True, "ms": 2500.0, "ms_text": "2500.00+", "connect_ms": None}),
    ("no BTF: bytes unknown, never guessed", dict(bytes_known=0, tx_bytes=0, rx_bytes=0),
     {"tx_bytes": None, "rx_bytes": None, "tx_kb": None, "rx_kb": None}),
    ("owner never seen", dict(pid=0, comm=bytes(16)), {"pid": None, "comm": None}),
    ("remote closed first", dict(closer=2), {"closed_by": "remote"}),
    ("reset", dict(closer=3), {"closed_by": "reset"}),
    ("closer unknown", dict(closer=0), {"closed_by": None}),
    ("a closer a later program may add", dict(closer=9), {"closed_by": None}),
    ("no retransmit tracepoint", dict(retrans_known=0, retransmits=0), {"retransmits": None}),
    ("KB round down as tcplife's", dict(tx_bytes=2047, rx_bytes=2048), {"tx_kb": 1, "rx_kb": 2}),
    ("a long COMM is kept whole", dict(comm=b"averyveryverylon"), {"comm": "averyveryverylon"}),
]


@pytest.mark.parametrize("what,fields,expected", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode(what, fields, expected):
    got = as_dict(decode(event(**fields)))
    assert set(got) == set(EVERYTHING)
    for key, value in expected.items():
        assert got[key] == value, key


def test_counters_of_an_unexpected_size_are_not_shown():
    ctx = {"btf": {"tcp_sock.bytes_acked": (1824, 8), "tcp_sock.bytes_received": (1752, 4)}}
    got = as_dict(decode(event(), **ctx))
    assert (got["tx_bytes"], got["rx_bytes"]) == (None, None)
    ctx = {"btf": {f"tcp_sock.{m}": where for m, where in BTF_OFFSETS.items()}}
    assert as_dict(decode(event(), **ctx))["tx_bytes"] == 100_002


# -- output ------------------------------------------------------------------

EVENTS = [
    event(),
    event(ts_ns=9_500_000_000, pid=181, comm=b"postgres-walsend", lport=443, rport=50123, family=10, saddr=V6,
          daddr=V6R, tx_bytes=5_000_001, rx_bytes=1_001, partial=1, connect_known=0, closer=2,
          span_ns=61_000_000_000, retransmits=0),
    event(ts_ns=9_600_000_000, pid=0, comm=bytes(16), bytes_known=0, closer=3, span_ns=40_000),
]


def test_table_default_fits_80_columns():
    text = render("table", EVENTS)
    assert text == (
        "PID   COMM       LADDR           LPORT RADDR           RPORT TX_KB RX_KB MS\n"
        "22597 curl       10.0.0.7        46644 93.184.216.34   443      97     4 1.23\n"
        "181   postgres-w 2001:db8::1     443   2001:db8:ffff:ffff:ffff:ffff:ffff:fffe 50123  4882     0 61000.00+\n"
        "-     -          10.0.0.7        46644 93.184.216.34   443       -     - 0.04\n"
    )
    lines = text.splitlines()
    assert len(lines[0]) <= 80 and len(lines[1]) <= 80 and len(lines[3]) <= 80
    # Every row has as many fields as the header: awk can count on them.
    assert {len(line.split()) for line in lines} == {9}


def test_table_wide_and_extended():
    text = render("table", EVENTS[:2], wide=True, extended=True)
    lines = text.splitlines()
    assert lines[0].split() == ["PID", "COMM", "IP", "LADDR", "LPORT", "RADDR", "RPORT", "TX_KB", "RX_KB",
                                "RETRANS", "CLOSED_BY", "CONN_MS", "MS"]
    assert lines[1].split() == ["22597", "curl", "4", "10.0.0.7", "46644", "93.184.216.34", "443", "97", "4",
                                "3", "local", "0.05", "1.23"]
    assert lines[2].split() == ["181", "postgres-walsend", "6", "2001:db8::1", "443",
                                "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", "50123", "4882", "0", "0", "remote",
                                "-", "61000.00+"]
    assert lines[2].startswith("181     postgres-walsend 6  2001:db8::1" + " " * 28 + " 443")


def test_csv():
    text = render("csv", EVENTS[1:], extended=True)
    assert text.splitlines() == [
        "pid,comm,family,laddr,lport,raddr,rport,tx_bytes,rx_bytes,retransmits,closed_by,connect_ms,ms,partial,"
        "cgroup_id,cgroup,container,pod_uid,netns",
        "181,postgres-walsend,6,2001:db8::1,443,2001:db8:ffff:ffff:ffff:ffff:ffff:fffe,50123,5000001,1001,0,"
        "remote,,61000.0,True,44,,,,4026531840",
        ",,4,10.0.0.7,46644,93.184.216.34,443,,,3,reset,0.0456,0.04,False,44,,,,4026531840",
    ]


def test_json():
    rows = [unwrap(json.loads(line)) for line in render("json", EVENTS, extended=True).splitlines()]
    assert rows[0] == {
        "pid": 22597, "comm": "curl", "family": 4, "laddr": "10.0.0.7", "lport": 46644, "raddr": "93.184.216.34",
        "rport": 443, "tx_bytes": 100002, "rx_bytes": 5001, "retransmits": 3, "closed_by": "local",
        "connect_ms": 0.0456, "ms": 1.234567, "partial": False, "cgroup_id": 44, "cgroup": None,
        "container": None, "pod_uid": None, "netns": 4026531840,
    }
    assert rows[1]["partial"] is True and rows[1]["connect_ms"] is None and rows[1]["ms"] == 61000.0
    assert rows[2]["pid"] is None and rows[2]["tx_bytes"] is None and rows[2]["closed_by"] == "reset"
    plain = unwrap(json.loads(render("json", EVENTS[:1]).splitlines()[0]))
    assert set(plain) == {"pid", "comm", "family", "laddr", "lport", "raddr", "rport", "tx_bytes", "rx_bytes",
                          "ms", "partial", "cgroup_id", "cgroup", "container", "pod_uid", "netns"}


# -- the C side --------------------------------------------------------------


def fake_btf(found):
    return lambda struct_name, members: ({m: found[m] for m in members if m in found}
                                         if struct_name == "tcp_sock" else {})


@pytest.mark.parametrize("kernel", ["6.1", "6.18"])
@pytest.mark.parametrize("offsets", [BTF_OFFSETS, None], ids=["btf", "no-btf"])
def test_program_generation(kernel, offsets):
    source = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    opts = runtime.RunOptions(buffer="ring", extended=True, pids=(4321,), lports=(8080,), family=10)
    btf_offsets = fake_btf(offsets) if offsets else (lambda s, m: None)
    plan = runtime.plan(life.SPEC, opts, source, btf_offsets=btf_offsets)
    text = plan.text
    assert plan.missing == []
    assert plan.release == source.kernel_release()
    for tp in life.SPEC.tracepoints:
        assert f"#define HAVE_{tp.event.upper()} 1" in text
        assert f"struct tp_{tp.event} {{" in text
        assert f"int {tp.function}(struct tp_{tp.event} *args)" in text
    for name in ("TCPTRACE_EXTENDED", "FILTER_PIDS", "FILTER_LPORTS", "TCPTRACE_RINGBUF"):
        assert f"#define {name} 1" in text
    assert "#define FILTER_FAMILY 10" in text
    assert "4321" not in text and "8080" not in text  # filter values go to maps, not into C
    assert text.count("#define TCPTRACE_OWNERS 1") == 1
    if offsets:
        assert "#define OFF_TCP_SOCK_BYTES_ACKED 1824" in text
        assert "#define OFF_TCP_SOCK_BYTES_RECEIVED 1752" in text
        assert plan.btf == {"tcp_sock.bytes_acked": (1824, 8), "tcp_sock.bytes_received": (1752, 8)}
    else:
        assert "#define OFF_TCP_SOCK" not in text
        assert plan.btf == {}


def test_program_without_optional_tracepoints():
    hidden = ("tcp:tcp_retransmit_skb", "tcp:tcp_receive_reset", "tcp:tcp_destroy_sock")
    source = tracefs.FormatSource(os.path.join(FORMATS, "6.18"), hidden=hidden)
    plan = runtime.plan(life.SPEC, runtime.RunOptions(extended=True), source, btf_offsets=fake_btf(BTF_OFFSETS))
    assert sorted(tp.name for tp, _why in plan.missing) == sorted(hidden)
    for name in hidden:
        event = name.split(":")[1]
        assert f"#define HAVE_{event.upper()} 1" not in plan.text
        assert f"struct tp_{event} {{" not in plan.text
    assert "#define HAVE_INET_SOCK_SET_STATE 1" in plan.text


def test_only_set_state_is_required():
    required = [tp.name for tp in life.SPEC.tracepoints if not tp.optional]
    assert required == ["sock:inet_sock_set_state"]
    assert life.SPEC.btf == {"tcp_sock": ["bytes_acked", "bytes_received"], **workload.BTF}


# -- command line ------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["-4", "-6"],
    ["-p", "abc"],
    ["-p", "0"],
    ["-L", "70000"],
    ["-D", ""],
    ["-o", "xml"],
    ["--duration", "0"],
    ["--max-events", "0"],
    ["-c"],  # life has no count mode
])
def test_bad_input_is_a_usage_error(args):
    result = CliRunner().invoke(cli, ["life", *args])
    assert result.exit_code == 2, result.output


def test_help_tells_what_needs_a_kprobe():
    result = CliRunner().invoke(cli, ["life", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for phrase in ("kretprobe on inet_csk_accept", "SO_REUSEPORT", "partial: true", "never guessed",
                   "-x, --extended", "tcptrace life -p 181"):
        assert phrase in text, phrase


def test_ebpf_prints_the_program_without_root():
    args = ["life", "-x", "-p", str(os.getpid()), "--ebpf", "--formats", os.path.join(FORMATS, "6.1")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)" in result.output
    assert "#define TCPTRACE_EXTENDED 1" in result.output and "#define FILTER_PIDS 1" in result.output
