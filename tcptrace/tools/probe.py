"""tcptrace probe: congestion window, RTT and windows of live TCP
connections from tcp:tcp_probe, as rows sampled in the kernel, log2
histograms or per-connection summaries."""

from .. import net
from ..layout import Layout
from ..spec import (CGROUP_COLUMN, IP_COLUMN, STATE_CHANGES, WORKLOAD_COLUMNS, WORKLOAD_FIELDS, Column, Counter,
                    DecodeContext, Example, Histogram, Option, Settings, ToolSpec, Tracepoint, with_workload_btf)
from ..workload import CGROUPS, owners_apply, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

# enum tcp_ca_state (include/uapi/linux/tcp.h): part of the kernel's user
# interface (TCP_INFO's tcpi_ca_state), so the same on every kernel; the
# tracepoint's format prints the bare number.
CA_STATES = {0: "Open", 1: "Disorder", 2: "CWR", 3: "Recovery", 4: "Loss"}
INFINITE_SSTHRESH = 0x7FFFFFFF  # TCP_INFINITE_SSTHRESH: no loss seen yet
SEQ = 1 << 32
INTERVAL_MS = 100  # events: the default --interval-ms

HISTS = {"rtt": 1, "cwnd": 2}  # HIST_OF in probe.bpf.c
BY = {"raddr": 1, "rport": 2, "lport": 3}  # HIST_BY
UNITS = {"rtt": ("srtt_us", "usecs"), "cwnd": ("cwnd", "segments")}

EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("pid", "u32"),
        ("cwnd", "u32"),
        ("ssthresh", "u32"),
        ("srtt_us", "u32"),
        ("snd_wnd", "u32"),
        ("rcv_wnd", "u32"),
        ("snd_nxt", "u32"),
        ("snd_una", "u32"),
        ("family", "u16"),
        ("lport", "u16"),
        ("rport", "u16"),
        ("owner_known", "u8"),
        ("ca_state", "u8"),
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
    ]
)

COUNT_VALUE = Layout(
    [
        ("samples", "u64"),
        ("bytes_acked", "u64"),
        ("srtt_sum", "u64"),
        ("first_ns", "u64"),
        ("last_ns", "u64"),
        ("srtt_min", "u32"),
        ("srtt_max", "u32"),
        ("cwnd", "u32"),
        ("ssthresh_min", "u32"),
        ("pid", "u32"),
        ("owner_known", "u8"),
        ("unused", "u8[3]"),
        ("comm", "char[16]"),
    ]
)

HIST_KEY = Layout([("addr", "u8[16]"), ("family", "u16"), ("port", "u16"), ("slot", "u32")])


def seq_diff(before, after):
    """How far sequence number `after` is past `before`, modulo 2**32."""
    return (after - before) % SEQ


def ssthresh_of(value):
    return value if value < INFINITE_SSTHRESH else None


OWNER = ("sock:inet_sock_set_state",)
CONG = ("tcp:tcp_cong_state_set",)

COLUMNS = (
    Column("pid", "PID", 7, "d", nullable=True, requires=OWNER, value="pid if owner_known else None"),
    Column("comm", "COMM", 10, truncate=True, wide=16, nullable=True, requires=OWNER,
           value="COMM[comm] if owner_known else None"),
    IP_COLUMN,
    Column("laddr", "LADDR", 15, wide=39, value="ADDRESS[family][saddr]"),
    Column("lport", "LPORT", 5, "d", value="lport"),
    Column("raddr", "RADDR", 15, wide=39, value="ADDRESS[family][daddr]"),
    Column("rport", "RPORT", 5, "d", value="rport"),
    Column("cwnd", "CWND", 6, "d", right=True, value="cwnd"),
    Column("ssthresh", "SSTHRESH", 8, "d", right=True, nullable=True, value="ssthresh_of(ssthresh)"),
    Column("srtt_us", "SRTT_US", 8, "d", right=True, value="srtt_us"),
    Column("snd_wnd", "SND_WND", 8, "d", right=True, value="snd_wnd"),
    Column("rcv_wnd", "RCV_WND", 8, "d", right=True, value="rcv_wnd"),
    Column("inflight", "INFLIGHT", 8, "d", right=True, value="seq_diff(snd_una, snd_nxt)"),
    Column("ca_state", "CA_STATE", 8, nullable=True, requires=CONG, value="CA_STATES.get(ca_state)"),
    CGROUP_COLUMN,
    *WORKLOAD_COLUMNS,
)

COUNT_COLUMNS = (
    Column("family", "IP", 2, "d"),
    Column("laddr", "LADDR", 15, wide=39),
    Column("lport", "LPORT", 5, "d"),
    Column("raddr", "RADDR", 15, wide=39),
    Column("rport", "RPORT", 5, "d"),
    Column("pid", "PID", 7, "d", nullable=True, requires=OWNER),
    Column("comm", "COMM", 10, nullable=True, requires=OWNER),
    Column("srtt_min_us", "SRTT_MIN", 8, "d"),
    Column("srtt_avg_us", "SRTT_AVG", 8, "d"),
    Column("srtt_max_us", "SRTT_MAX", 8, "d"),
    Column("cwnd", "CWND", 6, "d"),
    Column("ssthresh_min", "SSTHRESH", 8, "d", nullable=True),
    Column("bytes_acked", "BYTES_ACKED", 12, "d", requires=("tcp_sock.snd_una",)),
    Column("mbit_s", "MBIT/S", 8, ".2f", nullable=True),
)


def _owner(ctx, owner_known, pid, comm, family, laddr, lport, raddr, rport, netns=0):
    if owner_known:
        return pid, net.COMM[comm]
    # Unknown to the kernel: a socket opened before tracing began; /proc
    # answers for tcptrace's own network namespace only.
    if ctx.owners is not None and owners_apply(ctx, netns) and family in (net.AF_INET, net.AF_INET6):
        found = ctx.owners.lookup(family, laddr, lport, raddr, rport)
        if found:
            return found
    return None, None


def decode(ev, ctx: DecodeContext):
    (_ts, pid, cwnd, ssthresh, srtt_us, snd_wnd, rcv_wnd, snd_nxt, snd_una, family, lport, rport,
     owner_known, ca_state, saddr, daddr, comm, cgroup_id, netns) = ev
    laddr = net.ADDRESS[family][saddr]
    raddr = net.ADDRESS[family][daddr]
    pid, comm = _owner(ctx, owner_known, pid, comm, family, laddr, lport, raddr, rport, netns)
    work = workload_row(ctx, cgroup_id, netns)
    return (
        pid,
        comm,
        net.IP_VERSION.get(family, family),
        laddr,
        lport,
        raddr,
        rport,
        cwnd,
        ssthresh_of(ssthresh),
        srtt_us,
        snd_wnd,
        rcv_wnd,
        seq_diff(snd_una, snd_nxt),
        CA_STATES.get(ca_state),
        *work,
    )


def decode_count(key, value, ctx: DecodeContext):
    saddr, daddr, family, lport, rport = key
    (samples, acked, srtt_sum, first_ns, last_ns, srtt_min, srtt_max, cwnd, ssthresh_min, pid, owner_known,
     _unused, comm) = value
    laddr = net.ADDRESS[family][saddr]
    raddr = net.ADDRESS[family][daddr]
    pid, comm = _owner(ctx, owner_known, pid, comm, family, laddr, lport, raddr, rport)
    span_ns = last_ns - first_ns
    return (
        net.IP_VERSION.get(family, family),
        laddr,
        lport,
        raddr,
        rport,
        pid,
        comm,
        srtt_min,
        srtt_sum // samples if samples else 0,
        srtt_max,
        cwnd,
        ssthresh_of(ssthresh_min),
        acked,
        round(acked * 8e3 / span_ns, 2) if span_ns > 0 else None,
    )


def _hist_wanted(values):
    return bool(values.get("hist"))


def _hist_unit(values):
    return UNITS[values["hist"]]


def _hist_label(values, key, ctx):
    addr, family, port = key
    by = values.get("by")
    if by == "raddr":
        return (("raddr", net.ADDRESS[family][addr]),)
    if by in ("rport", "lport"):
        return ((by, port),)
    return ()


def configure(values, symbols):
    defines = {"PROBE_INTERVAL_NS": (values.get("interval_ms") or INTERVAL_MS) * 1_000_000}
    if values.get("all"):
        defines["PROBE_ALL"] = 1
    if values.get("hist"):
        defines.update(PROBE_HIST=1, HIST_OF=HISTS[values["hist"]], HIST_BY=BY.get(values.get("by"), 0))
    return Settings(defines)


OWN_OPTIONS = (
    Option("interval_ms", ("--interval-ms",), "Events: at most one row per socket every MS milliseconds "
           "(decided in the kernel).", metavar="MS", default=INTERVAL_MS, range=(1, 3_600_000)),
    Option("all", ("--all",), "Events: a row for every probe (every ACK received): heavy.", flag=True),
    Option("hist", ("--hist",), "Print a log2 histogram of srtt (rtt) or snd_cwnd (cwnd) instead of events.",
           choices=tuple(HISTS)),
    Option("by", ("--by",), "With --hist: one histogram per remote address, remote port or local port.",
           choices=tuple(BY), goes_with="hist"),
)


SPEC = ToolSpec(
    name="probe",
    summary="Trace TCP congestion window and RTT of live connections, as rows, histograms or summaries.",
    description=(
        "Sample the kernel's view of live TCP connections from tcp:tcp_probe, which fires "
        "for every segment an established socket receives: on the sender of bulk data, once "
        "per ACK. That is far too often to print, so the kernel keeps at most one row per "
        "socket every --interval-ms (default 100; --all for every probe): the owner (as in "
        "`life`), the endpoints, CWND (segments), SSTHRESH (blank until the first loss: the "
        "kernel's 'infinite'), SRTT_US (smoothed RTT, microseconds), SND_WND and RCV_WND "
        "(bytes), INFLIGHT (snd_nxt - snd_una, bytes) and CA_STATE (Open, Disorder, CWR, "
        "Recovery, Loss), which the kernel tracks from tcp:tcp_cong_state_set (Linux 5.19+; "
        "blank before, and for a socket opened before tracing until its state changes). The "
        "values are those before the segment that fired the probe is processed.\n\n"
        "--hist rtt|cwnd keeps a log2 histogram in the kernel instead, printed as bcc's "
        "tcprtt prints one at exit (and every -i SECONDS), one per --by raddr|rport|lport.\n\n"
        "-c keeps one summary per connection in the kernel: SAMPLES (probes), SRTT min/avg/max, "
        "the last CWND, the lowest SSTHRESH, BYTES_ACKED (the advance of snd_una while traced, "
        "modulo 2^32, plus at close the last acknowledgements, read from tcp_sock.snd_una at its "
        "BTF offset: a transfer of N bytes that began while tracing shows N + 1, its FIN) and "
        "MBIT/S (bytes acked over the time from the connection's first to its last probe in "
        "the interval), busiest first."
    ),
    bpf="probe.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        Tracepoint("tcp:tcp_probe", fields=("sport", "dport", "saddr", "daddr", "snd_nxt", "snd_una", "snd_cwnd",
                                            "ssthresh", "snd_wnd", "srtt", "rcv_wnd")),
        Tracepoint("tcp:tcp_cong_state_set", fields=("skaddr", "cong_state"), optional=True),
        Tracepoint(STATE_CHANGES.name, fields=("skaddr", "oldstate", "newstate", "sport", "dport", "family",
                                               "protocol", "saddr", "daddr", "saddr_v6", "daddr_v6"),
                   optional=True),
        Tracepoint("tcp:tcp_destroy_sock", fields=("skaddr",), optional=True),
    ),
    options=("pid", "localport", "remoteport", "ipv4", "ipv6", "time", "timestamp", "wide", "count", "interval",
             "top"),
    own_options=OWN_OPTIONS,
    configure=configure,
    counter=Counter(
        key=COUNT_KEY, columns=COUNT_COLUMNS, decode=decode_count, value=COUNT_VALUE, count="samples",
        count_header="SAMPLES", rank="bytes_acked",
        histogram=Histogram(key=HIST_KEY, wanted=_hist_wanted, unit=_hist_unit, label=_hist_label,
                            labels=(Column("raddr", "RADDR"), Column("rport", "RPORT", type="integer"),
                                    Column("lport", "LPORT", type="integer"))),
    ),
    btf=with_workload_btf({"tcp_sock": ["snd_una"]}),
    always_time=True,
    notes=(
        "bcc's tcprtt and tcpcong need kprobes or fentry for these answers; tcptrace reads "
        "them from the tracepoint. A socket is told apart by its address where tcp_probe has "
        "`skaddr` (6.18); on older kernels by its endpoints, learned when it became "
        "ESTABLISHED while tracing, else by its sock_cookie (no owner, no CA_STATE). -p "
        "matches sockets whose owner the kernel side knows (connected, accepted or listening "
        "while tracing). Without BTF, BYTES_ACKED misses what is acknowledged after the last "
        "probe of a connection. JSON keys: time, pid, comm, family, laddr, lport, raddr, "
        "rport, cwnd, ssthresh, srtt_us, snd_wnd, rcv_wnd, inflight, ca_state; with --hist "
        "one object per histogram: hist, the --by key, buckets ([low, high, count]) and count."
    ),
    examples=(
        Example("tcptrace probe", "cwnd, ssthresh, srtt and windows of every socket, 10 rows a second each"),
        Example("tcptrace probe -D 5201 --interval-ms 1000", "one row a second per connection to port 5201"),
        Example("tcptrace probe --hist rtt", "a histogram of smoothed RTTs, at Ctrl-C"),
        Example("tcptrace probe --hist rtt --by raddr", "one RTT histogram per remote address"),
        Example("tcptrace probe --hist cwnd -L 443", "congestion windows of local port 443"),
        Example("tcptrace probe -c --top 5", "the 5 connections that moved most data, with RTT and throughput"),
        Example("tcptrace probe -o json | jq .srtt_us", "one JSON object per row"),
    ),
)
