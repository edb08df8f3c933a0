"""tcptrace retrans: TCP retransmits, as bcc's tcpretrans shows them, from
tracepoints only; SYN-ACK retransmits as their own type."""

from .. import net, tcpstate
from ..layout import Layout
from ..spec import (CGROUP_COLUMN, ENDPOINT_COLUMNS, WORKLOAD_COLUMNS, WORKLOAD_FIELDS, Column, Counter, DecodeContext,
                    Example, ToolSpec, Tracepoint, with_workload_btf)
from ..workload import CGROUPS, owners_apply, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

# Values and flags shared with retrans.bpf.c.
RETRANS, SYNACK = 1, 2
OWNER_KNOWN, STATE_KNOWN, ERR_KNOWN = 1, 2, 4

TYPES = {RETRANS: ("retrans", "R>"), SYNACK: ("synack", "S>")}

EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("pid", "u32"),
        ("state", "s32"),
        ("err", "s32"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("type", "u8"),
        ("flags", "u8"),
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("comm", "char[16]"),
        *WORKLOAD_FIELDS,
    ]
)

COUNT_KEY = Layout(
    [
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("type", "u16"),
    ]
)

# "255.255.255.255:65535" is 21 characters; a bracketed IPv6 endpoint up to 47.
ENDPOINT, ENDPOINT_WIDE = 21, 47

OWNER = ("sock:inet_sock_set_state",)  # else only sockets /proc can still name

COLUMNS = (
    CGROUP_COLUMN,
    Column("pid", "PID", 7, "d", requires=OWNER, nullable=True),
    Column("comm", "COMM", table=False, requires=OWNER, nullable=True),
    Column("family", "IP", 2, "d"),
    Column("laddr", "LADDR", table=False),
    Column("lport", "LPORT", table=False, type="integer"),
    Column("local", "LADDR:LPORT", ENDPOINT, wide=ENDPOINT_WIDE, json=False),
    Column("arrow", "T>", 2, json=False),
    Column("raddr", "RADDR", table=False),
    Column("rport", "RPORT", table=False, type="integer"),
    Column("remote", "RADDR:RPORT", ENDPOINT, wide=ENDPOINT_WIDE, json=False),
    Column("state", "STATE", 11, nullable=True),
    Column("type", "TYPE", table=False),
    Column("err", "ERR", table=False, type="integer", nullable=True),
    *WORKLOAD_COLUMNS,
)

COUNT_COLUMNS = (
    Column("family", "IP", 2, "d"),
    *ENDPOINT_COLUMNS,
    Column("type", "TYPE", 7),
)

_ANY = {net.AF_INET: "0.0.0.0", net.AF_INET6: "::"}


def _owner_keys(kind, family, laddr, lport, raddr, rport):
    """Where /proc may list the socket: the connection itself, or for a
    SYN-ACK its listener, bound to the address or to any (an IPv6 listener
    on :: also takes IPv4)."""
    if kind != SYNACK:
        return [(family, laddr, lport, raddr, rport)]
    keys = [(family, laddr, lport, _ANY[family], 0), (family, _ANY[family], lport, _ANY[family], 0)]
    if family == net.AF_INET:
        keys.append((net.AF_INET6, "::", lport, "::", 0))
    return keys


def _owner_from_proc(ctx, kind, family, laddr, lport, raddr, rport):
    if ctx.owners is None or family not in _ANY:
        return None
    for key in _owner_keys(kind, family, laddr, lport, raddr, rport):
        owner = ctx.owners.lookup(*key)
        if owner:
            return owner
    return None


def decode(ev, ctx: DecodeContext):
    _ts, pid, state, err, family, lport, rport, kind, flags, saddr, daddr, comm, cgroup_id, netns = ev
    laddr = net.ADDRESS[family][saddr]
    raddr = net.ADDRESS[family][daddr]
    name, arrow = TYPES.get(kind, (str(kind), "?>"))
    if flags & OWNER_KNOWN:
        owner = (pid, net.COMM[comm])
    elif owners_apply(ctx, netns):
        # Unknown to the kernel: a socket opened before tracing began.
        owner = _owner_from_proc(ctx, kind, family, laddr, lport, raddr, rport)
    else:
        owner = None  # /proc answers for tcptrace's own network namespace only
    pid, comm = owner or (None, None)
    work = workload_row(ctx, cgroup_id, netns)
    return (
        work[0],
        pid,
        comm,
        net.IP_VERSION.get(family, family),
        laddr,
        lport,
        net.endpoint(family, laddr, lport),
        arrow,
        raddr,
        rport,
        net.endpoint(family, raddr, rport),
        tcpstate.name(state) if flags & STATE_KNOWN else None,
        name,
        err if flags & ERR_KNOWN else None,
        *work[1:],
    )


def decode_count(key, ctx: DecodeContext):
    saddr, daddr, family, lport, rport, kind = key
    return (
        net.IP_VERSION.get(family, family),
        net.ADDRESS[family][saddr],
        lport,
        net.ADDRESS[family][daddr],
        rport,
        TYPES.get(kind, (str(kind),))[0],
    )


SPEC = ToolSpec(
    name="retrans",
    summary="Trace TCP retransmits and SYN-ACK retransmits, or count them.",
    description=(
        "Trace TCP retransmits (tcp:tcp_retransmit_skb), one row each, as bcc's "
        "tcpretrans shows them: T is R> for a segment sent again and S> for a "
        "SYN-ACK sent again (tcp:tcp_retransmit_synack), which points at a "
        "listener that does not get the handshake's last ACK (a saturated accept "
        "queue, a SYN flood, loss on the way in) rather than at the network. "
        "PID is the socket's owner (for S>, the listener's), learned from its "
        "state changes (sock:inet_sock_set_state) or, for a socket opened before "
        "tracing began, from /proc; blank (JSON null) when unknown, never the task "
        "that happened to be on the CPU. STATE is the connection's state when the "
        "kernel reports it, blank otherwise. With -c, counts per connection and "
        "type are kept in the kernel and printed at exit (and every -i SECONDS), "
        "busiest first."
    ),
    bpf="retrans.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        Tracepoint(
            "tcp:tcp_retransmit_skb",
            fields=("skaddr", "sport", "dport", "saddr", "daddr", "saddr_v6", "daddr_v6"),
            since="4.15",
        ),
        Tracepoint(
            "tcp:tcp_retransmit_synack",
            fields=("skaddr", "sport", "dport", "saddr", "daddr", "saddr_v6", "daddr_v6"),
            since="4.15",
            optional=True,
        ),
        Tracepoint(
            "sock:inet_sock_set_state",
            fields=("skaddr", "oldstate", "newstate", "sport", "protocol"),
            since="4.16",
            optional=True,
        ),
    ),
    options=("pid", "localport", "remoteport", "ipv4", "ipv6", "time", "timestamp", "wide",
             "count", "interval", "top", "failed"),
    counter=Counter(key=COUNT_KEY, columns=COUNT_COLUMNS, decode=decode_count),
    btf=with_workload_btf({}),
    always_time=True,
    notes=(
        "Tail loss probes (bcc's tcpretrans -l) are not shown: the kernel has no "
        "tracepoint for them, and tracing tcp_send_loss_probe() would need a "
        "kprobe, which tcptrace never uses. "
        "Kernels whose tcp_retransmit_skb has an `err` field (6.18 has it, 6.1 "
        "does not) also report attempts that failed and sent nothing; those are "
        "left out, as kernels without the field never report them, and --failed "
        "shows only them (JSON key `err`, a negative errno). "
        "-p matches sockets whose owner the kernel side knows: connected, "
        "accepted, listening or closed while tracing, or accepted by a listener "
        "that was already open; a connection established before tracing began "
        "matches once its owner closes it. Owners read from /proc are those of "
        "tcptrace's own network namespace. "
        "JSON keys: time, pid, comm, family, laddr, lport, raddr, rport, state, "
        "type (retrans or synack), err (null where the kernel has no such field)."
    ),
    examples=(
        Example("tcptrace retrans", "trace TCP retransmits and SYN-ACK retransmits"),
        Example("tcptrace retrans -c", "count them per connection in the kernel, print at Ctrl-C"),
        Example("tcptrace retrans -c -i 5 --top 10", "the 10 busiest connections every 5 seconds"),
        Example("tcptrace retrans -4 -L 443", "only IPv4 and local port 443"),
        Example("tcptrace retrans -p 1234", "only sockets owned by PID 1234"),
        Example("tcptrace retrans -6 -w", "only IPv6, with wide address columns"),
        Example("tcptrace retrans -o json | jq .", "one JSON object per retransmit"),
        Example("tcptrace retrans --failed", "only retransmits the kernel failed to send"),
    ),
)
