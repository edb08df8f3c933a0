"""tcptrace top: who is moving bytes right now, per connection, process,
port or workload, every interval, from the send/receive tracepoints."""

import time
from dataclasses import replace

from .. import net
from ..layout import Layout
from ..spec import (CGROUP_COLUMN, IP_COLUMN, WORKLOAD_COLUMNS, WORKLOAD_FIELDS, Column, Counter, DecodeContext,
                    Example, Option, ToolSpec, Tracepoint, with_workload_btf)
from ..workload import CGROUPS, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

SEND = "sock:sock_send_length"
RECV = "sock:sock_recv_length"
PROBE = "tcp:tcp_probe"

# One socket's bytes in one interval (struct event in top.bpf.c): the value
# of the kernel's hashes.
EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("rx_bytes", "u64"),
        ("tx_bytes", "u64"),
        ("calls", "u64"),
        ("pid", "u32"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("tx_acked", "u8"),
        ("owner_known", "u8"),
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("comm", "char[16]"),
        *WORKLOAD_FIELDS,
    ]
)

COUNT_KEY = Layout([("sk", "u64"), ("closed_ns", "u64")])

BY = ("conn", "pid", "rport", "lport", "cgroup")
# What each --by view groups on, and so shows in its table besides the bytes.
VIEW = {
    "conn": None,
    "pid": ("pid", "comm"),
    "rport": ("rport",),
    "lport": ("lport",),
    "cgroup": ("cgroup_label", "cgroup_id", "cgroup", "container", "pod_uid"),
}
BYTES = ("rx_bytes", "tx_bytes", "bytes", "count")

COLUMNS = (
    CGROUP_COLUMN,
    # No value: top prints interval tables, never a stream of events.
    Column("pid", "PID", 7, "d", nullable=True),
    Column("comm", "COMM", 12, truncate=True, wide=16, nullable=True, value="COMM[comm] if owner_known else None"),
    IP_COLUMN,
    Column("laddr", "LADDR", 15, wide=39, nullable=True, value="ADDRESS[family][saddr]"),
    Column("lport", "LPORT", 5, "d", nullable=True, value="lport"),
    Column("raddr", "RADDR", 15, wide=39, nullable=True, value="ADDRESS[family][daddr]"),
    Column("rport", "RPORT", 5, "d", nullable=True, value="rport"),
    Column("rx_kb", "RX_KB", 8, "d", right=True, json=False, nullable=True, requires=(RECV,),
           value="None if tx_acked else rx_bytes // 1024"),
    Column("tx_kb", "TX_KB", 8, "d", right=True, json=False, value="tx_bytes // 1024"),
    Column("rx_kb_s", "RX_KB/s", 9, ".1f", right=True, json=False, extended=True, nullable=True,
           requires=(RECV,), value="None"),
    Column("tx_kb_s", "TX_KB/s", 9, ".1f", right=True, json=False, extended=True, nullable=True, value="None"),
    Column("rx_bytes", "RX_BYTES", table=False, type="integer", nullable=True, requires=(RECV,),
           value="None if tx_acked else rx_bytes"),
    Column("tx_bytes", "TX_BYTES", table=False, type="integer", value="tx_bytes"),
    Column("bytes", "BYTES", table=False, type="integer", value="(0 if tx_acked else rx_bytes) + tx_bytes"),
    Column("tx_acked", "TX_ACKED", table=False, type="boolean", value="bool(tx_acked)"),
    Column("interval_start", "INTERVAL_START", table=False, nullable=True, value="None"),
    Column("interval_s", "INTERVAL_S", table=False, type="number", nullable=True, value="None"),
    *WORKLOAD_COLUMNS,
)
# Where each key is in a row; the session appends CALLS (`count`) last.
_AT = {**{c.key: i for i, c in enumerate(COLUMNS)}, "count": len(COLUMNS)}


def decode(ev, ctx: DecodeContext):
    (_ts, rx, tx, _calls, pid, family, lport, rport, tx_acked, owner_known, saddr, daddr, comm, cgroup_id,
     netns) = ev
    address = net.ADDRESS[family]
    work = workload_row(ctx, cgroup_id, netns)
    rx = None if tx_acked else rx
    if not owner_known:
        pid, name = None, None
        laddr, raddr = address[saddr], address[daddr]
        # tcp_probe runs in softirq: the owner comes from /proc, if it still has the socket.
        if ctx.owners is not None and family in (net.AF_INET, net.AF_INET6):
            found = ctx.owners.lookup(family, laddr, lport, raddr, rport)
            if found:
                pid, name = found
    else:
        name = net.COMM[comm]
    return (
        work[0],
        pid,
        name,
        net.IP_VERSION[family],
        address[saddr],
        lport,
        address[daddr],
        rport,
        None if rx is None else rx // 1024,
        tx // 1024,
        None,
        None,
        rx,
        tx,
        (rx or 0) + tx,
        bool(tx_acked),
        None,
        None,
        *work[1:],
    )


def decode_count(key, value, ctx: DecodeContext):
    return decode(value, ctx)


def acked_only(ctx):
    """Whether this run counts TX from tcp_probe (a kernel before 6.3)."""
    return PROBE in (ctx.tracepoints or ())


def _rfc3339(seconds):
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1e6):06d}Z"


def _sum(values):
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def regroup(rows, by):
    """The per-connection rows summed per `by` (a VIEW key): the grouped
    columns keep their value, bytes and calls add up, the rest is blank."""
    if VIEW.get(by) is None:
        return [list(r) for r in rows]
    keys = [_AT[k] for k in VIEW[by]]
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[i] for i in keys), []).append(row)
    out = []
    for members in groups.values():
        merged = [None] * len(members[0])
        for i in keys:
            merged[i] = members[0][i]
        for name in BYTES:
            i = _AT[name]
            merged[i] = _sum(r[i] for r in members)
        merged[_AT["tx_acked"]] = any(r[_AT["tx_acked"]] for r in members)
        out.append(merged)
    return out


def finish(values, columns, rows, interval, ctx):
    """An interval's rows as --by asks, with the KB columns, the rates
    and the interval's keys filled in."""
    by = values.get("by") or "conn"
    start, seconds = interval
    rows = regroup(rows, by)
    for row in rows:
        rx, tx = row[_AT["rx_bytes"]], row[_AT["tx_bytes"]]
        row[_AT["rx_kb"]] = None if rx is None else rx // 1024
        row[_AT["tx_kb"]] = tx // 1024
        row[_AT["rx_kb_s"]] = None if rx is None or seconds <= 0 else round(rx / 1024 / seconds, 1)
        row[_AT["tx_kb_s"]] = round(tx / 1024 / seconds, 1) if seconds > 0 else None
        row[_AT["interval_start"]] = _rfc3339(start)
        row[_AT["interval_s"]] = round(seconds, 6)
    shown = VIEW[by]
    out = []
    for col in columns:
        if shown is not None and col.table and col.key not in shown and col.key not in BYTES \
                and not col.key.startswith(("rx_kb", "tx_kb")):
            col = replace(col, table=False)
        if by == "cgroup" and col is CGROUP_COLUMN:
            col = replace(col, table=True)
        if acked_only(ctx) and col.key in ("tx_kb", "tx_kb_s"):
            col = replace(col, header=col.header.replace("TX_", "TX_ACKED_"))
        out.append(col)
    return out, [tuple(r) for r in rows]


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def title(rows, interval, ctx):
    """tcptop's first line, with the interval's totals of every row (not
    only those shown)."""
    rx = _sum(r[_AT["rx_bytes"]] for r in rows)
    tx = sum(r[_AT["tx_bytes"]] for r in rows)
    what = "TX_ACKED" if acked_only(ctx) else "TX"
    received = "-" if rx is None and acked_only(ctx) else (rx or 0) // 1024
    return (f"{time.strftime('%H:%M:%S', time.localtime(interval[0] + interval[1]))} loadavg: {load_average()}  "
            f"RX {received} KB  {what} {tx // 1024} KB  in {interval[1]:.2f} s")


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 10**7:  # also refuses nan
        raise ValueError(f"{text} is not a number of seconds from 0 to 10000000")
    return value


OWN_OPTIONS = (
    Option("interval", ("-i", "--interval"), "Print every SECONDS.", metavar="SECONDS", default=1.0,
           parse=_seconds),
    Option("by", ("--by",), "One row per connection (conn), process (pid), remote port, local port or cgroup.",
           choices=BY, default="conn"),
    Option("top", ("--top",), "Only the N busiest rows (default: a table shows what fits the terminal, 20 into a pipe; "
           "JSON and CSV every row).",
           metavar="N", range=(1, 10**6)),
    Option("no_clear", ("-C", "--no-clear"), "Do not clear the screen: append each interval's table.", flag=True),
    Option("intervals", ("--count",), "Print K intervals, then exit.", metavar="K", range=(1, 10**9)),
)


SPEC = ToolSpec(
    name="top",
    summary="Count the bytes each TCP connection moves, busiest first, every interval (like top).",
    description=(
        "Every -i SECONDS (default 1), a screen like bcc's tcptop: a line with the time, the load "
        "average and the interval's total RX and TX, then one row per connection, busiest first: "
        "PID, COMM, LADDR, LPORT, RADDR, RPORT, RX_KB and TX_KB (the interval's application bytes: "
        "what recv() and send() moved, so they match what applications and their logs count, "
        "not sequence space), with -x the rates, and CALLS (the calls that moved bytes). On a "
        "terminal the screen is redrawn in place (-C appends); into a pipe each interval is "
        "appended. --by pid|rport|lport|cgroup adds the connections up per process, port or "
        "cgroup v2.\n\n"
        "Counted in the kernel per socket from sock:sock_send_length and sock:sock_recv_length "
        "(Linux 6.3+), in the process that moves the bytes, so PID and COMM are that process (the "
        "last one, for a socket two processes use). The bytes of a connection that closed during "
        "the interval are in that interval, and nothing counted while an interval is read is lost "
        "(two hashes swapped by a generation, read after an RCU grace period)."
    ),
    bpf="top.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        Tracepoint(SEND, fields=("sk", "family", "protocol", "ret"), optional=True),
        Tracepoint(RECV, fields=("sk", "family", "protocol", "ret", "flags"), optional=True),
        Tracepoint(PROBE, fields=("saddr", "daddr", "snd_una", ("skaddr", "sock_cookie")), instead_of=(SEND, RECV),
                   why="TX is the bytes acknowledged (tcp:tcp_probe's snd_una, sequence space: a FIN counts 1), "
                       "headed TX_ACKED_KB; RX is blank; -p matches nothing."),
        Tracepoint("tcp:tcp_destroy_sock", fields=("skaddr",)),
    ),
    options=("pid", "localport", "remoteport", "ipv4", "ipv6", "wide", "extended"),
    own_options=OWN_OPTIONS,
    counter=Counter(
        key=COUNT_KEY, columns=COLUMNS, decode=decode_count, value=EVENT, count="calls", count_header="CALLS",
        rank="bytes",
        always=True, generations=True, finish=finish, title=title, redraw=lambda values: not values.get("no_clear"),
        top=20, intervals="intervals",
    ),
    btf=with_workload_btf({"sock_common": ["skc_num", "skc_dport", "skc_rcv_saddr", "skc_daddr",
                                           "skc_v6_rcv_saddr", "skc_v6_daddr"]}),
    notes=(
        "bcc's tcptop needs kprobes (tcp_sendmsg, tcp_cleanup_rbuf); top reads tracepoints. "
        "Before Linux 6.3 top falls back to tcp:tcp_probe: TX_ACKED_KB is the bytes the peer "
        "acknowledged (sequence space), RX is blank, PID and COMM come from /proc, and -p "
        "matches nothing. -L, -D, -4, -6, -p, --cgroup and --netns are checked in the kernel. JSON "
        "(-o json) and CSV: one object or line per row per interval with pid, comm, family, "
        "laddr, lport, raddr, rport, rx_bytes, tx_bytes, bytes (their sum), tx_acked, interval_start, interval_s, "
        "count (CALLS) and the workload keys; a key --by does not group on is null."
    ),
    examples=(
        Example("tcptrace top", "the busiest connections, redrawn every second"),
        Example("tcptrace top --by pid", "bytes per process"),
        Example("tcptrace top -C -i 5 --count 3", "three 5-second tables, appended, then exit"),
        Example("tcptrace top -L 443 --top 10", "the 10 busiest connections of local port 443"),
        Example("tcptrace top --by cgroup", "bytes per cgroup v2 (container)"),
        Example("tcptrace top -o json --count 1 -i 10", "ten seconds of rows as JSON Lines"),
    ),
)
