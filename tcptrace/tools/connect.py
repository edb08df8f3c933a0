"""tcptrace connect: active TCP opens, with the connecting process, the
connect latency and how failed attempts failed (bcc's tcpconnect and
tcpconnlat, from the state tracepoint)."""

import errno

from .. import net
from ..layout import Layout
from ..spec import (CGROUP_COLUMN, IP_COLUMN, ENDPOINT_COLUMNS, STATE_CHANGES, WORKLOAD_COLUMNS, WORKLOAD_FIELDS,
                    Column, DecodeContext, Example, ToolSpec, Tracepoint, with_workload_btf)
from ..workload import CGROUPS, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

ERROR_UNKNOWN = -1  # the kernel has no BTF: sk_err could not be read

# sk_err values with a plain name; any other is shown as its errno symbol.
RESULTS = {
    0: "CLOSED",  # the application closed the socket before the handshake completed
    errno.ETIMEDOUT: "TIMEOUT",
    errno.ECONNREFUSED: "REFUSED",
}

EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("skaddr", "u64"),
        ("lat_ns", "u64"),
        ("pid", "u32"),
        ("error", "s32"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("failed", "u8"),
        ("reset", "u8"),
        ("saddr", "u8[16]"),
        ("daddr", "u8[16]"),
        ("comm", "char[16]"),
        *WORKLOAD_FIELDS,
    ]
)

COLUMNS = (
    CGROUP_COLUMN,
    Column("pid", "PID", 7, "d", value="pid"),
    Column("comm", "COMM", 10, truncate=True, value="COMM[comm]"),
    IP_COLUMN,
    *ENDPOINT_COLUMNS,
    Column("lat_ms", "LAT(ms)", 8, ".3f", right=True, value="lat_ns / 1e6"),
    Column("result", "RESULT", value='result(failed, reset, error) if failed else "OK"'),
    *WORKLOAD_COLUMNS,
)


def result(failed, reset, error):
    """OK, or how the attempt failed: a reset (REFUSED) first, then sk_err."""
    if not failed:
        return "OK"
    if reset:
        return "REFUSED"
    if error == ERROR_UNKNOWN:
        return "FAILED"
    return RESULTS.get(error) or errno.errorcode.get(error) or f"ERROR{error}"


_COMM, _ADDRESS, _VERSION = net.COMM, net.ADDRESS, net.IP_VERSION


def decode(ev, ctx: DecodeContext):
    _ts, _skaddr, lat_ns, pid, error, family, lport, rport, failed, reset, saddr, daddr, comm, cgroup_id, netns = ev
    address = _ADDRESS[family]
    work = workload_row(ctx, cgroup_id, netns)
    return (
        work[0],
        pid,
        _COMM[comm],
        _VERSION[family],
        address[saddr],
        lport,
        address[daddr],
        rport,
        lat_ns / 1e6,
        result(failed, reset, error),
        *work[1:],
    )


SPEC = ToolSpec(
    name="connect",
    summary="Trace TCP connects: who, to where, how long the handshake took, how it failed.",
    description=(
        "Trace active TCP opens (connect()) from sock:inet_sock_set_state: the process that "
        "called connect(), the endpoints and LAT(ms), from connect() to the SYN-ACK for a "
        "connect that succeeded (bcc's tcpconnlat measures the same) or to the failure for "
        "one that did not. RESULT is OK, REFUSED (a reset answered the SYN), TIMEOUT (the "
        "SYN retries ran out), CLOSED (the application closed the socket before the "
        "handshake completed, e.g. its own timeout), or the error the kernel recorded on "
        "the socket (EHOSTUNREACH, ENETUNREACH... from ICMP). The row is written when the "
        "handshake ends, so a timeout shows up when the kernel gives up. --failed shows "
        "only failed attempts (filtered in the kernel)."
    ),
    bpf="connect.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        STATE_CHANGES,
        Tracepoint("tcp:tcp_receive_reset", fields=("skaddr",), optional=True),
    ),
    options=("pid", "localport", "remoteport", "ipv4", "ipv6", "time", "timestamp", "wide",
             "failed"),
    btf=with_workload_btf({"sock": ("sk_err",)}),
    notes=(
        "A connect() that fails before the kernel sends its SYN (no route, no free local "
        "port) never reaches SYN_SENT and is not shown: seeing it would need a kprobe on "
        "tcp_v4_connect/tcp_v6_connect, which tcptrace does not use. A connect already under "
        "way when tracing began is not shown either. Without BTF (/sys/kernel/btf/vmlinux) a "
        "failure other than a reset is shown as FAILED."
    ),
    examples=(
        Example("tcptrace connect", "trace every connect with its latency and result"),
        Example("tcptrace connect --failed", "only connects that failed"),
        Example("tcptrace connect -p 181", "only connects made by PID 181"),
        Example("tcptrace connect -D 443", "only connects to port 443"),
        Example("tcptrace connect -6 -w", "only IPv6, with wide address columns"),
        Example("tcptrace connect -o json | jq 'select(.lat_ms > 100)'", "slow handshakes"),
    ),
)
