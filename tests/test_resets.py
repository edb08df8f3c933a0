"""tcptrace resets without the kernel: decoding, every output format, count
mode and the program generated for both tcp_send_reset layouts."""

import io
import json
import os
import socket

import pytest
from click.testing import CliRunner

from events import make_event
from helpers import unwrap
from tcptrace import codegen, output, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.spec import Column, DecodeContext
from tcptrace.tools import resets

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")
V4 = socket.inet_pton(socket.AF_INET, "10.1.2.3") + bytes(12)
V4R = socket.inet_pton(socket.AF_INET, "93.184.216.34") + bytes(12)
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
V6R = socket.inet_pton(socket.AF_INET6, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe")


def source(kernel):
    return tracefs.FormatSource(os.path.join(FORMATS, kernel))


def context(kernel="6.18"):
    """What the runtime hands decode(): the kernel's own symbol tables."""
    fmt = source(kernel).load("tcp:tcp_send_reset")
    return DecodeContext(symbols=runtime.symbols_of({"tcp:tcp_send_reset": fmt}))


def event(**kw):
    base = dict(ts_ns=5_000_000_000, skaddr=0xFFFF9FD7E8192000, pid=4242, state=1, reason=11, family=2,
                lport=443, rport=51234, dir=resets.SENT, owner_known=1, saddr=V4, daddr=V4R,
                comm=b"nginx".ljust(16, b"\0"))
    base.update(kw)
    return make_event(resets.SPEC, **base)


NO_SOCKET = dict(skaddr=0, pid=0, owner_known=0, state=0, reason=1, comm=bytes(16))
RECEIVED = dict(dir=resets.RECV, reason=resets.REASON_NONE, state=2, lport=51234, rport=443, saddr=V4R,
                daddr=V4, comm=b"curl\0")


@pytest.mark.parametrize("fields,row", [
    ({}, (4242, "nginx", 4, "SENT", "10.1.2.3", 443, "93.184.216.34", 51234, "ESTABLISHED",
          "TCP_ABORT_ON_CLOSE")),
    (NO_SOCKET, (None, None, 4, "SENT", "10.1.2.3", 443, "93.184.216.34", 51234, None, "NO_SOCKET")),
    (RECEIVED, (4242, "curl", 4, "RECV", "93.184.216.34", 51234, "10.1.2.3", 443, "SYN_SENT", None)),
    (dict(family=10, saddr=V6, daddr=V6R, state=9, reason=0),
     (4242, "nginx", 6, "SENT", "2001:db8::1", 443, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", 51234,
      "LAST_ACK", "NOT_SPECIFIED")),
    (dict(reason=200, state=13, dir=7), (4242, "nginx", 4, "7", "10.1.2.3", 443, "93.184.216.34", 51234,
                                         "13", "200")),
], ids=["sent", "no-socket", "received", "v6", "unknown-values"])
def test_decode(fields, row):
    decoded = resets.decode(event(**fields), context())
    assert decoded[1:-5] == row
    assert decoded[:1] + decoded[-5:] == (None,) * 6  # no workload in these events (cgroup_id, netns 0)


def test_reason_names_come_from_the_kernels_format_file():
    """The 6.18 file names every reason; 6.1 has no reason field, so its
    program sends REASON_NONE and no table is consulted."""
    table = context("6.18").symbols[resets.REASON_SYMBOLS]
    assert table[1] == "NO_SOCKET" and table[11] == "TCP_ABORT_ON_CLOSE" and table[14] == "TCP_STATE"
    assert resets.REASON_SYMBOLS not in context("6.1").symbols
    assert resets.decode(event(reason=1), context("6.1"))[-6] == "1"
    assert resets.decode(event(reason=resets.REASON_NONE), context("6.1"))[-1] is None


def render(kind, events, **kw):
    stream = io.StringIO()
    w = output.writer(kind, stream, resets.COLUMNS, **kw)
    w.header()
    for ev in events:
        w.row(ev[0], resets.decode(ev, context()))
    return stream.getvalue()


def test_table_golden():
    text = render("table", [event(), event(**NO_SOCKET), event(**RECEIVED)])
    assert text.splitlines() == [
        "PID     COMM       DIR  LADDR           LPORT RADDR           RPORT STATE       REASON",
        "4242    nginx      SENT 10.1.2.3        443   93.184.216.34   51234 ESTABLISHED TCP_ABORT_ON_CLOSE",
        "-       -          SENT 10.1.2.3        443   93.184.216.34   51234 -           NO_SOCKET",
        "4242    curl       RECV 93.184.216.34   51234 10.1.2.3        443   SYN_SENT    -",
    ]
    assert text.index("REASON") == 80  # the fixed columns fill 80; the reason name runs on


def test_table_wide():
    header, row = render("table", [event(family=10, saddr=V6, daddr=V6R)], wide=True).splitlines()
    assert header.split() == ["PID", "COMM", "IP", "DIR", "LADDR", "LPORT", "RADDR", "RPORT", "STATE", "REASON"]
    assert row.index("443") == header.index("LPORT")


def test_csv_golden():
    text = render("csv", [event(), event(**NO_SOCKET)])
    assert text.splitlines() == [
        "pid,comm,family,dir,laddr,lport,raddr,rport,state,reason,cgroup_id,cgroup,container,pod_uid,netns",
        "4242,nginx,4,SENT,10.1.2.3,443,93.184.216.34,51234,ESTABLISHED,TCP_ABORT_ON_CLOSE,,,,,",
        ",,4,SENT,10.1.2.3,443,93.184.216.34,51234,,NO_SOCKET,,,,,",
    ]


def test_json_golden():
    lines = render("json", [event(**NO_SOCKET), event(**RECEIVED)], show_time=True).splitlines()
    first, second = (unwrap(json.loads(line)) for line in lines)
    assert list(first) == ["time", "pid", "comm", "family", "dir", "laddr", "lport", "raddr", "rport", "state",
                           "reason", "cgroup_id", "cgroup", "container", "pod_uid", "netns"]
    first.pop("time")
    assert first == {"pid": None, "comm": None, "family": 4, "dir": "SENT", "laddr": "10.1.2.3", "lport": 443,
                     "raddr": "93.184.216.34", "rport": 51234, "state": None, "reason": "NO_SOCKET",
                     "cgroup_id": None, "cgroup": None, "container": None, "pod_uid": None, "netns": None}
    assert second["dir"] == "RECV" and second["reason"] is None and second["state"] == "SYN_SENT"


def count_key(**kw):
    base = dict(saddr=V4, daddr=V4R, family=2, lport=443, rport=51234, dir=resets.SENT, unused=0, reason=1)
    base.update(kw)
    return make_event(resets.COUNT_KEY, **base)


def test_count_rows_and_summary():
    ctx = context()
    rows = [resets.decode_count(count_key(), ctx) + (7,),
            resets.decode_count(count_key(dir=resets.RECV, reason=resets.REASON_NONE, family=10, saddr=V6,
                                          daddr=V6R), ctx) + (2,)]
    assert rows[0] == ("SENT", "10.1.2.3", 443, "93.184.216.34", 51234, "NO_SOCKET", 7)
    assert rows[1] == ("RECV", "2001:db8::1", 443, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", 51234, None, 2)
    columns = list(resets.COUNT_COLUMNS) + [Column("count", "COUNT", 8, "d", right=True)]
    stream = io.StringIO()
    output.writer("table", stream, resets.COLUMNS).summary(columns, rows)
    assert stream.getvalue().splitlines() == [
        "DIR    LADDR        LPORT    RADDR                                   RPORT    REASON     COUNT",
        "SENT   10.1.2.3     443      93.184.216.34                           51234    NO_SOCKET  7",
        "RECV   2001:db8::1  443      2001:db8:ffff:ffff:ffff:ffff:ffff:fffe  51234    -          2",
    ]
    stream = io.StringIO()
    output.writer("json", stream, resets.COLUMNS).summary(columns, rows[:1])
    assert unwrap(json.loads(stream.getvalue())) == {"dir": "SENT", "laddr": "10.1.2.3", "lport": 443,
                                             "raddr": "93.184.216.34", "rport": 51234, "reason": "NO_SOCKET",
                                             "count": 7}


# Where each kernel's tcp_send_reset record keeps what the program reads.
SEND_RESET_LAYOUT = {
    "6.18": {"skaddr": 16, "state": 24, "reason": 28, "saddr": 32, "daddr": 60},
    "6.1": {"skaddr": 16, "state": 24, "sport": 28, "dport": 30, "family": 32, "saddr": 34, "daddr": 38,
            "saddr_v6": 42, "daddr_v6": 58},
    "4.19": {"skaddr": 16, "sport": 24, "dport": 26, "saddr": 28, "daddr": 32, "saddr_v6": 36, "daddr_v6": 52},
}


@pytest.mark.parametrize("kernel", sorted(SEND_RESET_LAYOUT))
def test_program_for_each_send_reset_layout(kernel):
    plan = runtime.plan(resets.SPEC, runtime.RunOptions(), source(kernel), release=kernel)
    fmt = plan.formats["tcp:tcp_send_reset"]
    generated = codegen.tp_layout(fmt)
    for name, offset in SEND_RESET_LAYOUT[kernel].items():
        assert generated.offsets[name] == offset, name
    text = plan.text
    assert codegen.tp_struct(fmt) in text
    sockaddr = kernel == "6.18"
    assert ("#define HAS_TCP_SEND_RESET_SADDR 28" in text) is sockaddr
    assert ("#define HAS_TCP_SEND_RESET_SPORT 2" in text) is not sockaddr
    assert ("#define HAS_TCP_SEND_RESET_REASON 4" in text) is sockaddr
    assert ("#define HAS_TCP_SEND_RESET_FAMILY 2" in text) is (kernel == "6.1")
    assert ("#define HAS_TCP_SEND_RESET_STATE 4" in text) is (kernel != "4.19")
    assert "#define TCPTRACE_OWNERS 1" in text
    for tp in resets.SPEC.tracepoints:
        assert f"int {tp.function}(struct tp_{tp.event} *args)" in text


def test_count_and_filters_reach_the_program_as_integers():
    opts = runtime.RunOptions(count=True, pids=(1,), lports=(443,), family=10)
    text = runtime.plan(resets.SPEC, opts, source("6.18"), release="6.18").text
    head = text.split("struct tp_")[0]
    for define in ("TCPTRACE_COUNT 1", "FILTER_PIDS 1", "FILTER_LPORTS 1", "FILTER_FAMILY 10"):
        assert f"#define {define}" in head
    assert "443" not in text


def test_ebpf_for_both_layouts_without_root():
    runner = CliRunner()
    for kernel, marker in (("6.18", "__u8 saddr[28];"), ("6.1", "__u16 sport;")):
        result = runner.invoke(cli, ["resets", "--ebpf", "--formats", os.path.join(FORMATS, kernel)])
        assert result.exit_code == 0, result.output
        assert marker in result.output and "int on_tcp_send_reset(struct tp_tcp_send_reset *args)" in result.output


@pytest.mark.parametrize("args", [["-4", "-6"], ["-i", "2"], ["--top", "3"], ["--failed"], ["-L", "0"],
                                  ["-p", "x"]])
def test_usage_errors(args):
    result = CliRunner().invoke(cli, ["resets", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_help_says_what_needs_a_kprobe():
    result = CliRunner().invoke(cli, ["resets", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "kprobe" in text and "6.10" in text and "NO_SOCKET" not in text
