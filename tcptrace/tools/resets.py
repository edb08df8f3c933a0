"""tcptrace resets: every TCP reset sent or received, with its owner, the
socket's state and, where the kernel gives it, why it was sent."""

from .. import net, tcpstate
from ..layout import Layout
from ..spec import (CGROUP_COLUMN, IP_COLUMN, ENDPOINT_COLUMNS, WORKLOAD_COLUMNS, WORKLOAD_FIELDS, Column, Counter,
                    DecodeContext, Example, ToolSpec, Tracepoint, with_workload_btf)
from ..workload import CGROUPS, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

SENT, RECV = 0, 1
DIRECTIONS = {SENT: "SENT", RECV: "RECV"}
REASON_NONE = -1  # the kernel's tracepoint has no reason (received resets, kernels before 6.10)
REASON_SYMBOLS = "tcp:tcp_send_reset.reason"

EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("skaddr", "u64"),
        ("pid", "u32"),
        ("state", "s32"),
        ("reason", "s32"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("dir", "u8"),
        ("owner_known", "u8"),
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("comm", "char[16]"),
        *WORKLOAD_FIELDS,
    ]
)

COLUMNS = (
    CGROUP_COLUMN,
    Column("pid", "PID", 7, "d", nullable=True),
    Column("comm", "COMM", 10, truncate=True, nullable=True),
    IP_COLUMN,
    Column("dir", "DIR", 4),
    *ENDPOINT_COLUMNS,
    Column("state", "STATE", 11, nullable=True),
    Column("reason", "REASON", requires=("tcp:tcp_send_reset.reason",), nullable=True),
    *WORKLOAD_COLUMNS,
)

COUNT_KEY = Layout(
    [
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("dir", "u8"),
        ("unused", "u8"),
        ("reason", "s32"),
    ]
)

COUNT_COLUMNS = (
    Column("dir", "DIR", 4),
    *ENDPOINT_COLUMNS,
    Column("reason", "REASON", requires=("tcp:tcp_send_reset.reason",), nullable=True),
)


def reason_name(reason, ctx):
    """The running kernel's own name for a reset reason (its format file's
    symbol table); a value the table lacks is shown as its number."""
    if reason == REASON_NONE:
        return None
    return ctx.symbols.get(REASON_SYMBOLS, {}).get(reason) or str(reason)


def direction(value):
    return DIRECTIONS.get(value) or str(value)


def decode(ev, ctx: DecodeContext):
    _ts, _skaddr, pid, state, reason, family, lport, rport, dir_, known, saddr, daddr, comm, cgroup_id, netns = ev
    work = workload_row(ctx, cgroup_id, netns)
    return (
        work[0],
        pid if known else None,
        net.COMM[comm] if known else None,
        net.IP_VERSION.get(family, family),
        direction(dir_),
        net.ADDRESS[family][saddr],
        lport,
        net.ADDRESS[family][daddr],
        rport,
        tcpstate.name(state) if state else None,
        reason_name(reason, ctx),
        *work[1:],
    )


def decode_count(key, ctx: DecodeContext):
    saddr, daddr, family, lport, rport, dir_, _unused, reason = key
    return (
        direction(dir_),
        net.ADDRESS[family][saddr],
        lport,
        net.ADDRESS[family][daddr],
        rport,
        reason_name(reason, ctx),
    )


SPEC = ToolSpec(
    name="resets",
    summary="Trace TCP resets sent and received, with their owner and reason.",
    description=(
        "Trace every TCP reset (RST) this host sends (tcp:tcp_send_reset) or receives "
        "(tcp:tcp_receive_reset). LADDR/LPORT is always this host's side: the sender of a SENT "
        "reset, the receiver of a RECV one. PID and COMM are the socket's owner (the process "
        "that connected or listened while tracing ran), not the task on the CPU: resets "
        "happen in softirq context. They are blank for a reset that answers a segment no "
        "socket wanted (a SYN to a closed port: STATE is blank too) and for a socket opened "
        "before tracing began. STATE is the socket's state when the reset was sent or "
        "received; an abort (close() with unread data, SO_LINGER 0) moves the socket to "
        "CLOSE just before the kernel sends the RST, so STATE shows the state it left. "
        "REASON is the kernel's own name for why it sent the reset, from its format file "
        "(Linux 6.10 and later; blank before, and for received resets)."
    ),
    bpf="resets.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        Tracepoint("tcp:tcp_send_reset", fields=("skaddr", "saddr", "daddr")),
        Tracepoint("tcp:tcp_receive_reset",
                   fields=("skaddr", "sport", "dport", "saddr", "daddr", "saddr_v6", "daddr_v6")),
        Tracepoint(
            "sock:inet_sock_set_state",
            fields=("skaddr", "oldstate", "newstate", "sport", "protocol"),
            since="4.16",
        ),
    ),
    options=("pid", "localport", "remoteport", "ipv4", "ipv6", "time", "timestamp", "wide",
             "count", "interval", "top"),
    counter=Counter(key=COUNT_KEY, columns=COUNT_COLUMNS, decode=decode_count),
    btf=with_workload_btf({}),
    notes=(
        "Not seen: resets that netfilter sends (REJECT with tcp-reset) bypass TCP and its "
        "tracepoints. Before Linux 6.10 tcp_send_reset fires only for a full socket: resets "
        "answering a segment that found no socket (a closed port), a TIME_WAIT or a "
        "half-open request socket are not traced at all, and there is no reason field; "
        "getting those would need a kprobe on tcp_v4_send_reset/tcp_v6_send_reset, which "
        "tcptrace does not use."
    ),
    examples=(
        Example("tcptrace resets", "trace resets sent and received"),
        Example("tcptrace resets -L 443", "only resets on local port 443"),
        Example("tcptrace resets -p 181", "only resets on sockets owned by PID 181"),
        Example("tcptrace resets -6 -w", "only IPv6, with wide address columns"),
        Example("tcptrace resets -c", "count per endpoint pair, direction and reason until Ctrl-C"),
        Example("tcptrace resets -c -i 5 --top 10", "the 10 busiest every 5 seconds"),
        Example("tcptrace resets -o json | jq .reason", "why the kernel sent each reset"),
    ),
)
