"""tcptrace states: every TCP state change, as bcc's tcpstates shows it."""

from .. import net, tcpstate
from ..layout import Layout
from ..spec import (CGROUP_COLUMN, IP_COLUMN, ENDPOINT_COLUMNS, STATE_CHANGES, WORKLOAD_COLUMNS, WORKLOAD_FIELDS,
                    Column, DecodeContext, Example, ToolSpec, with_workload_btf)
from ..workload import CGROUPS, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

DELTA_UNKNOWN = (1 << 64) - 1

EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("skaddr", "u64"),
        ("delta_ns", "u64"),
        ("pid", "u32"),
        ("oldstate", "s32"),
        ("newstate", "s32"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("comm", "char[16]"),
        *WORKLOAD_FIELDS,
    ]
)

COLUMNS = (
    CGROUP_COLUMN,
    Column("skaddr", "SKADDR", 16, value='"%x" % skaddr'),  # hex text: JSON numbers past 2**53 lose digits
    Column("pid", "C-PID", 5, "d", value="pid"),
    Column("comm", "C-COMM", 10, truncate=True, value="COMM[comm]"),
    IP_COLUMN,
    *ENDPOINT_COLUMNS,
    Column("oldstate", "OLDSTATE", 11, value="STATE[oldstate]"),
    Column("arrow", "->", 2, json=False, constant="->"),
    Column("newstate", "NEWSTATE", 11, value="STATE[newstate]"),
    Column("ms", "MS", 0, ".3f", nullable=True, value="None if delta_ns == DELTA_UNKNOWN else delta_ns / 1e6"),
    *WORKLOAD_COLUMNS,
)


_STATE, _COMM, _ADDRESS, _VERSION = tcpstate.NAME, net.COMM, net.ADDRESS, net.IP_VERSION


def decode(ev, ctx: DecodeContext):
    _ts, skaddr, delta_ns, pid, old, new, family, lport, rport, saddr, daddr, comm, cgroup_id, netns = ev
    address = _ADDRESS[family]
    work = workload_row(ctx, cgroup_id, netns)
    return (
        work[0],
        "%x" % skaddr,
        pid,
        _COMM[comm],
        _VERSION[family],
        address[saddr],
        lport,
        address[daddr],
        rport,
        _STATE[old],
        "->",
        _STATE[new],
        None if delta_ns == DELTA_UNKNOWN else delta_ns / 1e6,
        *work[1:],
    )


SPEC = ToolSpec(
    name="states",
    summary="Trace TCP state changes, with the time spent in each state.",
    description=(
        "Trace every TCP state change (sock:inet_sock_set_state), with the time "
        "spent in the old state in milliseconds. C-PID and C-COMM are the task on "
        "the CPU when the change happened, as in bcc's tcpstates: many changes "
        "happen in softirq context, on behalf of no process (see `tcptrace life` "
        "for the socket's owner). MS is blank (JSON null) when the socket's "
        "previous change happened before tracing began."
    ),
    bpf="states.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        STATE_CHANGES,
    ),
    options=("localport", "remoteport", "ipv4", "ipv6", "time", "timestamp", "wide"),
    btf=with_workload_btf({}),
    examples=(
        Example("tcptrace states", "trace all TCP state changes"),
        Example("tcptrace states -T", "include a time column (HH:MM:SS)"),
        Example("tcptrace states -t", "include a timestamp column (seconds)"),
        Example("tcptrace states -L 80,443", "only local ports 80 and 443"),
        Example("tcptrace states -D 80", "only remote port 80"),
        Example("tcptrace states -6 -w", "only IPv6, with wide address columns"),
        Example("tcptrace states -o json | jq .", "one JSON object per state change"),
    ),
)
