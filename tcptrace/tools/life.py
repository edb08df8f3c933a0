"""tcptrace life: one row per closed TCP session, as bcc's tcplife shows it,
with byte counts read at offsets from the running kernel's BTF."""

from .. import net
from ..layout import Layout
from ..spec import (CGROUP_COLUMN, IP_COLUMN, ENDPOINT_COLUMNS, STATE_CHANGES, WORKLOAD_COLUMNS, WORKLOAD_FIELDS,
                    Column, DecodeContext, Example, ToolSpec, Tracepoint, with_workload_btf)
from ..workload import CGROUPS, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

# Appended to MS in the table when tracing began after the session did: the
# lifespan is then a lower bound. A suffix keeps the column count, and awk's
# numeric conversion ($NF + 0) still reads the number.
PARTIAL_MARK = "+"

CLOSERS = {1: "local", 2: "remote", 3: "reset"}

# The kernel side reads both counters as u64; a kernel whose BTF says
# otherwise would have had them read wrongly, so they are not shown.
BYTE_COUNTERS = ("tcp_sock.bytes_acked", "tcp_sock.bytes_received")
COUNTER_SIZE = 8

EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("span_ns", "u64"),
        ("connect_ns", "u64"),
        ("tx_bytes", "u64"),
        ("rx_bytes", "u64"),
        ("pid", "u32"),
        ("retransmits", "u32"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("partial", "u8"),
        ("bytes_known", "u8"),
        ("connect_known", "u8"),
        ("retrans_known", "u8"),
        ("closer", "u8"),
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("comm", "char[16]"),
        *WORKLOAD_FIELDS,
    ]
)

# Byte counts are shown only when the kernel side read them, at offsets of
# the size it reads (the per-batch _counters_trusted(ctx) of Column.value).
_KB = "{} // 1024 if bytes_known and _counters_trusted(ctx) else None"

COLUMNS = (
    CGROUP_COLUMN,
    Column("pid", "PID", 5, "d", wide=7, nullable=True, value="pid or None"),
    Column("comm", "COMM", 10, truncate=True, wide=16, nullable=True, value="COMM[comm] if pid else None"),
    IP_COLUMN,
    *ENDPOINT_COLUMNS,
    Column("tx_kb", "TX_KB", 5, "d", right=True, wide=6, json=False, requires=BYTE_COUNTERS,
           value=_KB.format("tx_bytes")),
    Column("rx_kb", "RX_KB", 5, "d", right=True, wide=6, json=False, requires=BYTE_COUNTERS,
           value=_KB.format("rx_bytes")),
    Column("tx_bytes", "TX_BYTES", table=False, requires=BYTE_COUNTERS, type="integer", nullable=True),
    Column("rx_bytes", "RX_BYTES", table=False, requires=BYTE_COUNTERS, type="integer", nullable=True),
    Column("retransmits", "RETRANS", 7, "d", right=True, extended=True, requires=("tcp:tcp_retransmit_skb",),
           nullable=True, value="retransmits if retrans_known else None"),
    # Without resets seen, a session that ends straight in CLOSE has no closer.
    Column("closed_by", "CLOSED_BY", 9, extended=True, requires=("tcp:tcp_receive_reset",), nullable=True,
           value="CLOSERS.get(closer)"),
    Column("connect_ms", "CONN_MS", 8, ".2f", right=True, extended=True, nullable=True,
           value="connect_ns / 1e6 if connect_known else None"),
    Column("ms", "MS", table=False, type="number"),
    Column("partial", "PARTIAL", table=False, type="boolean"),
    Column("ms_text", "MS", 0, json=False, value="'%.2f%s' % (span_ns / 1e6, PARTIAL_MARK if partial else '')"),
    *WORKLOAD_COLUMNS,
)


def _counters_trusted(ctx):
    btf = ctx.btf or {}
    return all(btf.get(key, (0, COUNTER_SIZE))[1] == COUNTER_SIZE for key in BYTE_COUNTERS)


def _kb(count):
    return None if count is None else count // 1024


_COMM, _ADDRESS, _VERSION = net.COMM, net.ADDRESS, net.IP_VERSION


def decode(ev, ctx: DecodeContext):
    (_ts, span_ns, connect_ns, tx, rx, pid, retransmits, family, lport, rport,
     partial, bytes_known, connect_known, retrans_known, closer, saddr, daddr, comm, cgroup_id, netns) = ev
    if not (bytes_known and _counters_trusted(ctx)):
        tx = rx = None
    ms = span_ns / 1e6
    address = _ADDRESS[family]
    work = workload_row(ctx, cgroup_id, netns)
    return (
        work[0],
        pid or None,
        _COMM[comm] if pid else None,
        _VERSION[family],
        address[saddr],
        lport,
        address[daddr],
        rport,
        _kb(tx),
        _kb(rx),
        tx,
        rx,
        retransmits if retrans_known else None,
        CLOSERS.get(closer),
        connect_ns / 1e6 if connect_known else None,
        ms,
        bool(partial),
        f"{ms:.2f}{PARTIAL_MARK if partial else ''}",
        *work[1:],
    )


SPEC = ToolSpec(
    name="life",
    summary="Trace TCP sessions as they close: owner, bytes and lifespan.",
    description=(
        "Print one row per TCP session when it closes (sock:inet_sock_set_state), as "
        "bcc's tcplife does: the process that owns the socket, the endpoints, the "
        "kilobytes sent and received and the lifespan in milliseconds. TX_KB and RX_KB "
        "are the kernel's own counters (tcp_sock.bytes_acked and bytes_received), read at "
        "offsets taken from the running kernel's BTF; they count TCP sequence space, so "
        "TX includes the SYN (on the connecting side) and the FIN, and RX the peer's FIN "
        "(on the side that closed first, only if it came before that side's socket was "
        "handed to TIME_WAIT). JSON and CSV carry exact tx_bytes and rx_bytes. Listening "
        "sockets are not sessions and are not shown.\n\n"
        "A session that began before tracing did is still shown: its MS ends in "
        f"'{PARTIAL_MARK}' (JSON partial: true) and counts from the first state change "
        "seen, a lower bound.\n\n"
        "With -x/--extended: RETRANS, the retransmits of the session "
        "(tcp:tcp_retransmit_skb; one event may carry several segments); CLOSED_BY, "
        "local (this end sent the first FIN, aborted or gave up), remote (the peer's FIN "
        "came first) or reset (a reset from the peer came first, tcp:tcp_receive_reset); "
        "CONN_MS, the time spent in SYN_SENT (connecting side) or SYN_RECV (accepting "
        "side) - for a failed connect, the time it took to fail. Modern kernels create "
        "the accepting side's socket when the handshake completes, so its CONN_MS is "
        "near zero."
    ),
    bpf="life.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        STATE_CHANGES,
        Tracepoint("tcp:tcp_destroy_sock", fields=("skaddr",), since="4.15", optional=True),
        Tracepoint("tcp:tcp_retransmit_skb", fields=("skaddr",), since="4.15", optional=True),
        Tracepoint("tcp:tcp_receive_reset", fields=("skaddr",), since="4.15", optional=True),
    ),
    options=("pid", "localport", "remoteport", "ipv4", "ipv6", "time", "timestamp", "wide", "extended"),
    examples=(
        Example("tcptrace life", "trace TCP sessions as they close"),
        Example("tcptrace life -T", "include a time column (HH:MM:SS)"),
        Example("tcptrace life -w", "wide columns (IPv6) and an IP column"),
        Example("tcptrace life -p 181", "only sessions of PID 181, accepted or connected"),
        Example("tcptrace life -L 80", "only sessions with local port 80"),
        Example("tcptrace life -D 80", "only sessions with remote port 80"),
        Example("tcptrace life -x", "add retransmits, who closed and connect latency"),
        Example("tcptrace life -o json", "one JSON object per session, exact byte counts"),
        Example("tcptrace life --cgroup /sys/fs/cgroup/system.slice/nginx.service",
                "only sessions of nginx's service (its cgroup and those below it)"),
        Example("tcptrace life --show-cgroup", "add a CGROUP column: container id or cgroup path"),
    ),
    btf=with_workload_btf({"tcp_sock": ["bytes_acked", "bytes_received"]}),
    notes=(
        "PID and COMM are the socket's owner: the process that called connect() or "
        "listen(), replaced by any process that later closes or shuts it down; they are "
        "blank when no such call was seen (a session opened before tracing and ended by "
        "a reset). Attribution can still be wrong when a socket was passed to another "
        "process that never closes it with a FIN (it is then credited to the process "
        "that called connect() or listen()), and when processes share one port through "
        "SO_REUSEPORT (an accepted session is credited to the last listener on the port "
        "until it is closed). Knowing the process that accept()ed a session needs a "
        "kretprobe on inet_csk_accept, which tcptrace does not use. Without kernel BTF "
        "(/sys/kernel/btf/vmlinux) TX_KB and RX_KB are '-' (JSON null): they are never "
        "guessed."
    ),
)
