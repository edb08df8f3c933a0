"""tcptrace accept: passive TCP opens, with the listening process (bcc's
tcpaccept, from the state tracepoint)."""

from .. import net
from ..layout import Layout
from ..spec import (CGROUP_COLUMN, IP_COLUMN, ENDPOINT_COLUMNS, STATE_CHANGES, WORKLOAD_COLUMNS, WORKLOAD_FIELDS,
                    Column, DecodeContext, Example, ToolSpec, with_workload_btf)
from ..workload import CGROUPS, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("skaddr", "u64"),
        ("syn_recv_ns", "u64"),
        ("pid", "u32"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("owner_known", "u8"),
        ("unused", "u8"),
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("comm", "char[16]"),
        *WORKLOAD_FIELDS,
    ]
)

COLUMNS = (
    CGROUP_COLUMN,
    Column("pid", "PID", 7, "d", nullable=True, value="pid if owner_known else None"),
    Column("comm", "COMM", 10, truncate=True, nullable=True, value="COMM[comm] if owner_known else None"),
    IP_COLUMN,
    *ENDPOINT_COLUMNS,
    Column("syn_recv_ms", "SYN_RECV(ms)", 0, ".3f", value="syn_recv_ns / 1e6"),
    *WORKLOAD_COLUMNS,
)


_COMM, _ADDRESS, _VERSION = net.COMM, net.ADDRESS, net.IP_VERSION


def decode(ev, ctx: DecodeContext):
    _ts, _skaddr, syn_recv_ns, pid, family, lport, rport, known, _unused, saddr, daddr, comm, cgroup_id, netns = ev
    address = _ADDRESS[family]
    work = workload_row(ctx, cgroup_id, netns)
    return (
        work[0],
        pid if known else None,
        _COMM[comm] if known else None,
        _VERSION[family],
        address[saddr],
        lport,
        address[daddr],
        rport,
        syn_recv_ns / 1e6,
        *work[1:],
    )


SPEC = ToolSpec(
    name="accept",
    summary="Trace passive TCP opens: connections a listener established, with its process.",
    description=(
        "Trace passive TCP opens from sock:inet_sock_set_state: one row when a listening "
        "socket's new connection is established. PID and COMM are the process that put the "
        "listener in LISTEN (for a listener opened before tracing began, the owner /proc "
        "gives at start; blank when unknown). LADDR/LPORT is the listener's side. SYN_RECV(ms) "
        "is the time the new socket spent in SYN_RECV: since Linux 4.4 the kernel creates it "
        "only when the client's final ACK arrives, so it is near zero, except with TCP Fast "
        "Open, where it is the time from the SYN to that ACK."
    ),
    bpf="accept.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        STATE_CHANGES,
    ),
    options=("pid", "localport", "remoteport", "ipv4", "ipv6", "time", "timestamp", "wide"),
    btf=with_workload_btf({}),
    notes=(
        "The row is written when the handshake completes, not when the application calls "
        "accept(): bcc's tcpaccept reports the accept() call from a kretprobe on "
        "inet_csk_accept, and the time from the SYN to the final ACK sits in a request "
        "socket no tracepoint reports; both would need kprobes, which tcptrace does not use."
    ),
    examples=(
        Example("tcptrace accept", "trace every connection a listener established"),
        Example("tcptrace accept -L 80,443", "only on local ports 80 and 443"),
        Example("tcptrace accept -p 181", "only connections of listeners owned by PID 181"),
        Example("tcptrace accept -6 -w", "only IPv6, with wide address columns"),
        Example("tcptrace accept -T -o csv", "CSV with a time column"),
    ),
)
