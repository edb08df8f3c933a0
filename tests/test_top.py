"""tcptrace top without root: decoding a socket's entry, --by views and their
sums, the interval keys, the fallback's headers, the plan per kernel, the
stand-in tracepoint and the command line."""

import io
import json
import os

import jsonschema
import pytest
from click.testing import CliRunner

from tcptrace import events, output, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.runtime.session import Session
from tcptrace.spec import DecodeContext
from tcptrace.tools import top

FORMATS = os.path.join(os.path.dirname(__file__), "data", "formats")
LO4 = bytes([127, 0, 0, 1]) + bytes(12)
LO6 = bytes(15) + b"\x01"
INTERVAL = (1_700_000_000.25, 1.0)


def entry(rx, tx, pid=100, comm=b"curl", family=2, lport=40000, rport=80, acked=0, calls=3, cgroup=0):
    addr = LO4 if family == 2 else LO6
    return (1, rx, tx, calls, pid, family, lport, rport, acked, 1, addr, addr, comm.ljust(16, b"\0"), cgroup, 0)


def rows(entries, ctx=None):
    ctx = ctx or DecodeContext()
    return [tuple(top.decode_count((sk, 0), e, ctx)) + (e[3],) for sk, e in enumerate(entries)]


def columns():
    return list(top.COLUMNS) + [output.Column("count", "CALLS", 8, "d", right=True)]


def finished(entries, by="conn", ctx=None):
    ctx = ctx or DecodeContext()
    return top.finish({"by": by}, columns(), rows(entries, ctx), INTERVAL, ctx)


def as_dicts(cols, rs):
    return [dict(zip((c.key for c in cols), r)) for r in rs]


def test_a_socket_entry_decodes_to_its_bytes_and_owner():
    [row] = as_dicts(columns(), rows([entry(5_000, 1_000_000)]))
    assert row["pid"] == 100 and row["comm"] == "curl" and row["laddr"] == "127.0.0.1"
    assert (row["rx_bytes"], row["tx_bytes"], row["bytes"], row["rx_kb"], row["tx_kb"]) == (5_000, 1_000_000, 1_005_000,
                                                                                         4, 976)
    assert row["tx_acked"] is False and row["count"] == 3


def test_finish_fills_the_interval_and_the_rates():
    cols, rs = finished([entry(2048, 4096)])
    [row] = as_dicts(cols, rs)
    assert row["interval_start"] == "2023-11-14T22:13:20.250000Z" and row["interval_s"] == 1.0
    assert (row["rx_kb_s"], row["tx_kb_s"]) == (2.0, 4.0)


@pytest.mark.parametrize("by,key", [("pid", "pid"), ("rport", "rport"), ("lport", "lport"), ("cgroup", "cgroup_id")])
def test_by_views_add_up_the_connections(by, key):
    conns = [entry(10, 20, pid=1, rport=80, lport=1, cgroup=7), entry(1, 2, pid=1, rport=443, lport=2, cgroup=7),
             entry(100, 200, pid=2, rport=80, lport=3, cgroup=8), entry(5, 5, pid=3, rport=443, lport=1, cgroup=8)]
    _cols, flat = finished(conns)
    cols, grouped = finished(conns, by)
    want = {}
    for r in as_dicts(cols, flat):
        sums = want.setdefault(r[key], [0, 0, 0])
        for i, name in enumerate(("rx_bytes", "tx_bytes", "count")):
            sums[i] += r[name]
    got = {r[key]: [r["rx_bytes"], r["tx_bytes"], r["count"]] for r in as_dicts(cols, grouped)}
    assert got == want
    shown = [c.key for c in cols if c.table]
    assert "laddr" not in shown and "raddr" not in shown and "tx_kb" in shown
    for r in as_dicts(cols, grouped):
        assert r["laddr"] is None and r["bytes"] == r["rx_bytes"] + r["tx_bytes"]


def test_the_fallback_heads_tx_as_acknowledged_and_blanks_rx():
    ctx = DecodeContext(tracepoints=(top.PROBE, "tcp:tcp_destroy_sock"))
    cols, rs = finished([entry(0, 3000, acked=1)], ctx=ctx)
    assert [c.header for c in cols if c.key == "tx_kb"] == ["TX_ACKED_KB"]
    [row] = as_dicts(cols, rs)
    assert row["rx_bytes"] is None and row["rx_kb"] is None and row["tx_acked"] is True
    assert "TX_ACKED 2 KB" in top.title(rs, INTERVAL, ctx) and "RX - KB" in top.title(rs, INTERVAL, ctx)


def test_title_totals_every_row():
    cols, rs = finished([entry(2048, 0), entry(0, 4096)])
    line = top.title(rs, INTERVAL, DecodeContext())
    assert "loadavg:" in line and "RX 2 KB" in line and "TX 4 KB" in line


@pytest.mark.parametrize("kind", ["json", "csv", "table"])
def test_interval_rows_in_every_format(kind):
    cols, rs = finished([entry(10, 20), entry(1, 2, family=10)])
    stream = io.StringIO()
    w = output.writer(kind, stream, top.COLUMNS, tool="top")
    w.summary(cols, rs, title="T")
    w.summary(cols, rs, title="T")
    text = stream.getvalue()
    if kind == "json":
        validator = jsonschema.Draft202012Validator(json.loads(events.shipped()))
        objs = [json.loads(line) for line in text.splitlines()]
        assert len(objs) == 4 and all(not list(validator.iter_errors(o)) for o in objs)
        assert "rx_kb" not in objs[0] and objs[0]["interval_s"] == 1.0
    elif kind == "csv":
        lines = text.splitlines()
        assert len(lines) == 5 and lines[0].startswith("pid,comm,family,laddr") and "rx_kb" not in lines[0]
    else:
        assert text.count("RX_KB") == 2 and "rx_bytes" not in text and "\033" not in text


def test_redraw_clears_the_screen_first():
    stream = io.StringIO()
    output.writer("table", stream, top.COLUMNS).summary(*finished([entry(1, 2)]), title="T", redraw=True)
    assert stream.getvalue().startswith("\033[H\033[2JT\n")


def plan(kernel, **kw):
    opts = runtime.RunOptions(count=True, tool={"by": "conn"}, **kw)
    return runtime.plan(top.SPEC, opts, tracefs.FormatSource(os.path.join(FORMATS, kernel)), release=kernel,
                        btf_offsets=lambda s, m: {x: (8 * i, 2) for i, x in enumerate(sorted(m))})


def test_the_plan_counts_in_two_hashes_and_tests_the_protocol_first():
    text = plan("6.18", family=10, lports=(443,)).text
    for line in ("BPF_ARRAY(generation, u32, 1);", "BPF_HASH(counts, struct count_key, struct event",
                 "BPF_HASH(counts_odd, struct count_key, struct event", "#define FILTER_FAMILY 10"):
        assert line in text
    body = text[text.index("int on_sock_send_length("):]
    assert body.split("\n")[2].strip() == "if (!is_tcp(args->protocol))"
    assert "#define HAVE_SOCK_SEND_LENGTH 1" in text


@pytest.mark.parametrize("kernel,stand_in", [("6.1", True), ("6.12", False), ("6.18", False), ("5.4", True)])
def test_tcp_probe_stands_in_only_before_the_send_tracepoints(kernel, stand_in):
    session = Session(top.SPEC, runtime.RunOptions(), output.writer("json", io.StringIO(), top.COLUMNS))
    session.plan = plan(kernel)
    probe = next(tp for tp in top.SPEC.tracepoints if tp.name == top.PROBE)
    assert session._used(probe) is stand_in
    assert ("#define HAVE_SOCK_SEND_LENGTH 1" not in session.plan.text) is stand_in


@pytest.mark.parametrize("args,message", [
    (["--by", "host"], "--by"), (["--count", "0"], "--count"), (["-i", "nan"], "-i"), (["-i", "0"], "-i"),
    (["--top", "0"], "--top"), (["-c"], "No such option"),
])
def test_bad_options_are_usage_errors(args, message):
    result = CliRunner().invoke(cli, ["top", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_interval_and_top_stand_alone():
    """top only counts: -i and --top need no -c (the other tools' rule)."""
    result = CliRunner().invoke(cli, ["top", "-i", "2", "--top", "5", "--ebpf"])
    assert result.exit_code == 0 and "counts_odd" in result.output
