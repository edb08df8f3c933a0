"""tcptrace connect and accept without the kernel: decoding, every output
format, struct sync and the programs generated for other kernels."""

import errno
import io
import json
import os
import socket

import pytest
from click.testing import CliRunner

from events import make_event
from helpers import unwrap
from tcptrace import output, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.spec import DecodeContext
from tcptrace.tools import accept, connect

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")
V4 = socket.inet_pton(socket.AF_INET, "10.1.2.3") + bytes(12)
V4R = socket.inet_pton(socket.AF_INET, "93.184.216.34") + bytes(12)
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
V6R = socket.inet_pton(socket.AF_INET6, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe")


def source(kernel, hidden=()):
    return tracefs.FormatSource(os.path.join(FORMATS, kernel), hidden)


def connect_event(**kw):
    base = dict(ts_ns=7_000_000_000, skaddr=0xFFFF9FD7E8192000, lat_ns=1_373_000, pid=22384, error=0,
                family=2, lport=63446, rport=80, failed=0, reset=0, saddr=V4, daddr=V4R,
                comm=b"curl".ljust(16, b"\0"))
    base.update(kw)
    return make_event(connect.SPEC, **base)


def accept_event(**kw):
    base = dict(ts_ns=7_000_000_000, skaddr=0xFFFF9FD7E8193000, syn_recv_ns=4_600, pid=1031,
                family=2, lport=80, rport=63446, owner_known=1, unused=0, saddr=V4R, daddr=V4,
                comm=b"nginx".ljust(16, b"\0"))
    base.update(kw)
    return make_event(accept.SPEC, **base)


@pytest.mark.parametrize("fields,result", [
    ({}, "OK"),
    (dict(failed=1, reset=1, error=errno.ECONNREFUSED), "REFUSED"),
    (dict(failed=1, reset=1, error=connect.ERROR_UNKNOWN), "REFUSED"),  # no BTF: the reset still tells
    (dict(failed=1, error=errno.ETIMEDOUT), "TIMEOUT"),
    (dict(failed=1, error=0), "CLOSED"),
    (dict(failed=1, error=errno.ECONNREFUSED), "REFUSED"),  # ICMP port unreachable
    (dict(failed=1, error=errno.EHOSTUNREACH), "EHOSTUNREACH"),
    (dict(failed=1, error=errno.ENETUNREACH), "ENETUNREACH"),
    (dict(failed=1, error=connect.ERROR_UNKNOWN), "FAILED"),
    (dict(failed=1, error=4000), "ERROR4000"),
    (dict(error=errno.ETIMEDOUT), "OK"),  # an error after success is not the connect's
])
def test_connect_result(fields, result):
    assert connect.decode(connect_event(**fields), DecodeContext())[-6] == result


def test_connect_decode_every_column():
    assert connect.decode(connect_event(), DecodeContext()) == (
        None, 22384, "curl", 4, "10.1.2.3", 63446, "93.184.216.34", 80, 1.373, "OK", None, None, None, None, None)
    row = connect.decode(connect_event(family=10, saddr=V6, daddr=V6R, lat_ns=3_059_963_000, failed=1,
                                       error=errno.ETIMEDOUT), DecodeContext())
    assert row[1:-5] == (22384, "curl", 6, "2001:db8::1", 63446, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", 80,
                         3059.963, "TIMEOUT")


def test_accept_decode_every_column():
    assert accept.decode(accept_event(), DecodeContext()) == (
        None, 1031, "nginx", 4, "93.184.216.34", 80, "10.1.2.3", 63446, 0.0046, None, None, None, None, None)
    unknown = accept.decode(accept_event(owner_known=0, pid=0, comm=bytes(16), family=10, saddr=V6R, daddr=V6),
                            DecodeContext())
    assert unknown[1:-5] == (None, None, 6, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", 80, "2001:db8::1", 63446,
                             0.0046)


def render(tool, kind, events, **kw):
    stream = io.StringIO()
    w = output.writer(kind, stream, tool.COLUMNS, **kw)
    w.header()
    for ev in events:
        w.row(ev[0], tool.decode(ev, DecodeContext()))
    return stream.getvalue()


def test_connect_table_golden():
    text = render(connect, "table", [connect_event(), connect_event(failed=1, reset=1, lat_ns=52_000,
                                                                    comm=b"averyveryverylongname\0"[:16])])
    assert text.splitlines() == [
        "PID     COMM       LADDR           LPORT RADDR           RPORT  LAT(ms) RESULT",
        "22384   curl       10.1.2.3        63446 93.184.216.34   80       1.373 OK",
        "22384   averyveryv 10.1.2.3        63446 93.184.216.34   80       0.052 REFUSED",
    ]


def test_connect_wide_csv_json():
    header, row = render(connect, "table", [connect_event(family=10, saddr=V6, daddr=V6R)], wide=True).splitlines()
    assert header.split() == ["PID", "COMM", "IP", "LADDR", "LPORT", "RADDR", "RPORT", "LAT(ms)", "RESULT"]
    assert row.index("63446") == header.index("LPORT")
    assert render(connect, "csv", [connect_event(failed=1, error=0)]).splitlines() == [
        "pid,comm,family,laddr,lport,raddr,rport,lat_ms,result,cgroup_id,cgroup,container,pod_uid,netns",
        "22384,curl,4,10.1.2.3,63446,93.184.216.34,80,1.373,CLOSED,,,,,",
    ]
    assert unwrap(json.loads(render(connect, "json", [connect_event()]))) == {
        "pid": 22384, "comm": "curl", "family": 4, "laddr": "10.1.2.3", "lport": 63446,
        "raddr": "93.184.216.34", "rport": 80, "lat_ms": 1.373, "result": "OK", "cgroup_id": None, "cgroup": None, "container": None, "pod_uid": None, "netns": None}


def test_accept_outputs_golden():
    events = [accept_event(), accept_event(owner_known=0, pid=0, comm=bytes(16), syn_recv_ns=12_345_678)]
    assert render(accept, "table", events).splitlines() == [
        "PID     COMM       LADDR           LPORT RADDR           RPORT SYN_RECV(ms)",
        "1031    nginx      93.184.216.34   80    10.1.2.3        63446 0.005",
        "-       -          93.184.216.34   80    10.1.2.3        63446 12.346",
    ]
    assert render(accept, "csv", events).splitlines() == [
        "pid,comm,family,laddr,lport,raddr,rport,syn_recv_ms,cgroup_id,cgroup,container,pod_uid,netns",
        "1031,nginx,4,93.184.216.34,80,10.1.2.3,63446,0.0046,,,,,",
        ",,4,93.184.216.34,80,10.1.2.3,63446,12.345678,,,,,",
    ]
    first, second = (unwrap(json.loads(line)) for line in render(accept, "json", events).splitlines())
    assert first == {"pid": 1031, "comm": "nginx", "family": 4, "laddr": "93.184.216.34", "lport": 80,
                     "raddr": "10.1.2.3", "rport": 63446, "syn_recv_ms": 0.0046, "cgroup_id": None, "cgroup": None, "container": None, "pod_uid": None, "netns": None}
    assert second["pid"] is None and second["comm"] is None


def test_connect_program_for_6_1_and_6_18():
    def btf(struct_name, members):
        return {"sk_err": (284, 4)} if struct_name == "sock" else {}

    for kernel in ("6.1", "6.18"):
        plan = runtime.plan(connect.SPEC, runtime.RunOptions(extra={"FILTER_FAILED": 1}), source(kernel),
                            release=kernel, btf_offsets=btf)
        head = plan.text.split("struct tp_")[0]
        assert "#define OFF_SOCK_SK_ERR 284" in head and "#define FILTER_FAILED 1" in head
        assert "int on_tcp_receive_reset(struct tp_tcp_receive_reset *args)" in plan.text
        assert "#define HAVE_TCP_RECEIVE_RESET 1" in plan.text
        assert plan.missing == []
    # Without BTF the cause of a failure stays unknown; without
    # tcp_receive_reset the program still builds, its handler compiled out.
    plan = runtime.plan(connect.SPEC, runtime.RunOptions(), source("6.18", hidden=["tcp:tcp_receive_reset"]),
                        release="6.18", btf_offsets=lambda s, m: None)
    assert "OFF_SOCK_SK_ERR" not in plan.text.split("struct tp_")[0]
    assert "#define HAVE_TCP_RECEIVE_RESET" not in plan.text and "struct tp_tcp_receive_reset {" not in plan.text
    assert [tp.name for tp, _why in plan.missing] == ["tcp:tcp_receive_reset"]


@pytest.mark.parametrize("kernel", ["6.1", "6.18"])
def test_accept_program(kernel):
    plan = runtime.plan(accept.SPEC, runtime.RunOptions(pids=(1,), lports=(80,)), source(kernel), release=kernel)
    assert "#define TCPTRACE_OWNERS 1" in plan.text
    assert "#define FILTER_PIDS 1" in plan.text and "#define FILTER_LPORTS 1" in plan.text
    assert "int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)" in plan.text


def test_failed_only_for_connect():
    runner = CliRunner()
    formats = os.path.join(FORMATS, "6.18")
    with_failed = runner.invoke(cli, ["connect", "--ebpf", "--formats", formats, "--failed"])
    without = runner.invoke(cli, ["connect", "--ebpf", "--formats", formats])
    assert with_failed.exit_code == 0 and without.exit_code == 0
    assert "#define FILTER_FAILED 1" in with_failed.output and "FILTER_FAILED 1" not in without.output
    assert runner.invoke(cli, ["accept", "--failed"]).exit_code == 2


@pytest.mark.parametrize("tool", ["connect", "accept"])
@pytest.mark.parametrize("args", [["-4", "-6"], ["-c"], ["-L", "70000"], ["-D", "x"], ["-p", "0"],
                                  ["--duration", "0"]])
def test_usage_errors(tool, args):
    result = CliRunner().invoke(cli, [tool, *args])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize("tool,words", [
    ("connect", ["kprobe", "tcp_v4_connect", "REFUSED", "TIMEOUT", "CLOSED", "--failed"]),
    ("accept", ["kprobe", "inet_csk_accept", "SYN_RECV(ms)", "Fast Open"]),
])
def test_help_explains(tool, words):
    result = CliRunner().invoke(cli, [tool, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for word in words:
        assert word in text
