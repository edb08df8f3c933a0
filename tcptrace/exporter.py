"""tcptrace exporter: TCP metrics for Prometheus, counted in the kernel.

One BPF program (bpf/exporter.bpf.c) counts state changes, session
lifespans and bytes, retransmits, resets and connect results into one
per-CPU struct, and TCP drops by reason into another; a scrape reads them
once (summing the CPUs) and turns them into metric families. Nothing runs
per event in user space.

Every series whose labels can be known before any traffic (the state
changes the kernel makes, this kernel's reset and drop reasons, connect
results, retransmit states) is served from the first scrape, at 0:
Prometheus' rate() and increase() need a sample before the first event,
or they miss the burst that created the series.

The metrics are declared once, in METRICS: the collector takes their names,
types and help from there, and so do `tcptrace exporter --help` and the
README's table (markdown_table()). Nothing here imports bcc; prometheus_client
is imported only when the exporter runs, so other subcommands never need it.
"""

import array
import ipaddress
import os
import re
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

from . import __version__, net, tcpstate, workload
from .errors import EXIT_OK, TcptraceError
from .layout import Layout
from .spec import DecodeContext, Example, Option, Settings, ToolSpec, Tracepoint, with_workload_btf
from .tools import connect, drops, probe, resets

DEFAULT_LISTEN = "127.0.0.1:9464"
MAX_TOP_REMOTES = 1000  # the bound on --top-remotes: series per remote metric
MAX_TOP_CGROUPS = 1000  # the bound on --top-cgroups: cgroups served
# A cgroup the resolver has not found for this long is gone: its kernel
# entry is deleted and its series are no longer served.
CGROUP_EXPIRY_S = 60.0
PREFIX = "tcptrace_"

# -- the kernel side's struct and slots (exporter.bpf.c) ---------------------------

STATE_SLOTS = 16
HIST_SLOTS = 64
REASON_SLOTS = 128
REASON_OTHER = 126
REASON_NONE = 127
ERRNO_SLOTS = 256
DROPS_BEYOND = 64  # drop reasons past the format's table (subsystem reasons: 0x30001 ...)
CA_SLOTS = 8  # congestion states: enum tcp_ca_state has 5

COUNTERS = Layout(
    [
        ("transitions", f"u64[{STATE_SLOTS * STATE_SLOTS}]"),
        ("duration_ns", f"u64[{HIST_SLOTS}]"),
        ("duration_ns_sum", "u64"),
        ("tx_bytes", f"u64[{HIST_SLOTS}]"),
        ("tx_bytes_sum", "u64"),
        ("rx_bytes", f"u64[{HIST_SLOTS}]"),
        ("rx_bytes_sum", "u64"),
        ("retransmits", f"u64[{STATE_SLOTS}]"),
        ("synack_retransmits", "u64"),
        ("resets_sent", f"u64[{REASON_SLOTS}]"),
        ("resets_received", "u64"),
        ("connects_ok", "u64"),
        ("connects_reset", "u64"),
        ("connects_unknown", "u64"),
        ("connect_errors", f"u64[{ERRNO_SLOTS}]"),
        ("srtt_us", f"u64[{HIST_SLOTS}]"),
        ("srtt_us_sum", "u64"),
        ("ca_transitions", f"u64[{CA_SLOTS * CA_SLOTS}]"),
    ]
)

REMOTE_KEY = Layout([("addr", "u8[16]"), ("family", "u16"), ("unused", "u16[3]")])
REMOTE_COUNTS = Layout([("connections", "u64"), ("retransmits", "u64")])
CGROUP_COUNTS = Layout([("sessions", "u64"), ("connects_ok", "u64"), ("connects_failed", "u64"),
                        ("retransmits", "u64"), ("resets_sent", "u64"), ("resets_received", "u64")])

# Histogram buckets: slot k of the kernel's histograms holds values in
# (2^(k-1), 2^k], so the bucket le=2^k is exact. Exported: this range of k,
# the smaller slots folded into the first bucket (buckets are cumulative).
DURATION_POWERS = range(10, 47)  # 2^10 ns (1 us) .. 2^46 ns (19.5 hours)
BYTES_POWERS = range(0, 41)  # 1 byte .. 1 TiB
SRTT_POWERS = range(0, 27)  # 1 us .. 2^26 us (67 s: past TCP_RTO_MAX, 120 s, only +Inf)

# -- the series that exist before any event -----------------------------------------

S = tcpstate.NAMES
# The state changes sock:inet_sock_set_state reports for TCP: tcp_set_state()
# and the listener's inet_csk_listen_start() / inet_csk_clone_lock() (a
# child is cloned from the listener, hence LISTEN->SYN_RECV). TIME_WAIT is
# never one: tcp_time_wait() hands the connection to a timewait mini-socket
# and closes the full socket (FIN_WAIT2->CLOSE). Others the kernel may make
# later are served from their first event.
TRANSITIONS = tuple((S[a], S[b]) for a, b in (
    (tcpstate.CLOSE, tcpstate.LISTEN), (tcpstate.LISTEN, tcpstate.CLOSE),
    (tcpstate.CLOSE, tcpstate.SYN_SENT), (tcpstate.SYN_SENT, tcpstate.ESTABLISHED),
    (tcpstate.SYN_SENT, tcpstate.CLOSE), (tcpstate.SYN_SENT, tcpstate.SYN_RECV),  # simultaneous open
    (tcpstate.LISTEN, tcpstate.SYN_RECV), (tcpstate.SYN_RECV, tcpstate.ESTABLISHED),
    (tcpstate.SYN_RECV, tcpstate.CLOSE), (tcpstate.SYN_RECV, tcpstate.FIN_WAIT1),  # Fast Open children
    (tcpstate.SYN_RECV, tcpstate.CLOSE_WAIT),
    (tcpstate.ESTABLISHED, tcpstate.FIN_WAIT1), (tcpstate.ESTABLISHED, tcpstate.CLOSE_WAIT),
    (tcpstate.ESTABLISHED, tcpstate.CLOSE),
    (tcpstate.FIN_WAIT1, tcpstate.FIN_WAIT2), (tcpstate.FIN_WAIT1, tcpstate.CLOSING),
    (tcpstate.FIN_WAIT1, tcpstate.CLOSE), (tcpstate.FIN_WAIT2, tcpstate.CLOSE),
    (tcpstate.CLOSING, tcpstate.CLOSE), (tcpstate.CLOSE_WAIT, tcpstate.LAST_ACK),
    (tcpstate.CLOSE_WAIT, tcpstate.CLOSE), (tcpstate.LAST_ACK, tcpstate.CLOSE),
))
# Where tcp_retransmit_skb can fire: the SYN, a Fast Open SYN-ACK with data,
# data, and a FIN in every state that has one outstanding.
RETRANSMIT_STATES = ("SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "CLOSING", "CLOSE_WAIT", "LAST_ACK")
# How a connect ends (tcptrace connect's RESULT): without BTF the socket's
# error is unknown and every failure without a reset is FAILED.
CONNECT_RESULTS = ("OK", "REFUSED", "TIMEOUT", "CLOSED", "EHOSTUNREACH", "ENETUNREACH")
CONNECT_RESULTS_NO_BTF = ("OK", "REFUSED", "FAILED")
CA_SYMBOLS = "tcp:tcp_cong_state_set.cong_state"
SENTINEL = "MAX"  # the end of a kernel enum's table, never a value

# -- the metrics: the one place they are declared ----------------------------------


@dataclass(frozen=True)
class Metric:
    name: str  # counters end in _total
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple = ()
    source: str = ""  # the tracepoint that feeds it, for the docs
    opt_in: str = ""  # the option without which it is not served

    @property
    def signature(self):
        return self.name + ("{" + ",".join(self.labels) + "}" if self.labels else "")


METRICS = (
    Metric(PREFIX + "tcp_state_transitions_total", "counter",
           "TCP state changes, by old and new state (the kernel's state names).",
           ("from", "to"), "sock:inet_sock_set_state"),
    Metric(PREFIX + "tcp_session_duration_seconds", "histogram",
           "Lifespans of TCP sessions that closed: from connect() (CLOSE->SYN_SENT) or from a "
           "listener's child (LISTEN->SYN_RECV) to CLOSE. Buckets are powers of two nanoseconds.",
           (), "sock:inet_sock_set_state"),
    Metric(PREFIX + "tcp_session_sent_bytes", "histogram",
           "Bytes each closed session sent and the peer acknowledged (tcp_sock.bytes_acked, with "
           "our SYN and FIN). Buckets are powers of two; not observed without kernel BTF.",
           (), "sock:inet_sock_set_state"),
    Metric(PREFIX + "tcp_session_received_bytes", "histogram",
           "Bytes each closed session received (tcp_sock.bytes_received, with the peer's FIN). "
           "Buckets are powers of two; not observed without kernel BTF.",
           (), "sock:inet_sock_set_state"),
    Metric(PREFIX + "tcp_retransmits_total", "counter",
           "Segments sent again, by the connection's state (\"unknown\" where the kernel does not "
           "say); attempts that failed to send are left out. One event may carry several segments.",
           ("state",), "tcp:tcp_retransmit_skb"),
    Metric(PREFIX + "tcp_synack_retransmits_total", "counter",
           "SYN-ACKs a listener sent again: handshakes whose last ACK did not arrive.",
           (), "tcp:tcp_retransmit_synack"),
    Metric(PREFIX + "tcp_resets_total", "counter",
           "Resets sent and received. reason is the running kernel's own name for why it sent one "
           "(Linux 6.10+: NO_SOCKET, TCP_ABORT_ON_CLOSE...); \"none\" for received resets and "
           "kernels without reasons.",
           ("direction", "reason"), "tcp:tcp_send_reset, tcp:tcp_receive_reset"),
    Metric(PREFIX + "tcp_connects_total", "counter",
           "Active opens by how the handshake ended, as `tcptrace connect` shows it: OK, REFUSED (a "
           "reset answered), TIMEOUT (the SYN retries ran out), CLOSED (the application gave up "
           "first), or the errno the socket kept (EHOSTUNREACH...); FAILED without kernel BTF. "
           "Failures are result!=\"OK\".",
           ("result",), "sock:inet_sock_set_state, tcp:tcp_receive_reset"),
    Metric(PREFIX + "tcp_drops_total", "counter",
           "TCP segments the kernel dropped, by its own reason (Linux 5.17+; names from the running "
           "kernel: NO_SOCKET, TCP_CSUM, NETFILTER_DROP...; a number its table lacks as the number), "
           "as `tcptrace drops -c` counts them: NOT_SPECIFIED and the values before it are not drops. "
           "Left out on older kernels and without kernel BTF.",
           ("reason",), "skb:kfree_skb"),
    Metric(PREFIX + "remote_connections_total", "counter",
           "Connections established (either direction) with each of the K busiest remote addresses.",
           ("remote",), "sock:inet_sock_set_state", "--top-remotes K"),
    Metric(PREFIX + "remote_retransmits_total", "counter",
           "Retransmits towards each of the K remote addresses with the most.",
           ("remote",), "tcp:tcp_retransmit_skb", "--top-remotes K"),
    Metric(PREFIX + "cgroup_sessions_total", "counter",
           "TCP sessions that closed, by the cgroup v2 of their socket (a container's id when the path names "
           "one, else the path), for the K busiest cgroups.",
           ("cgroup",), "sock:inet_sock_set_state", "--top-cgroups K"),
    Metric(PREFIX + "cgroup_connects_total", "counter",
           "Active opens by how the handshake ended (OK or FAILED), by the socket's cgroup.",
           ("cgroup", "result"), "sock:inet_sock_set_state", "--top-cgroups K"),
    Metric(PREFIX + "cgroup_retransmits_total", "counter",
           "Retransmits (as tcptrace_tcp_retransmits_total) by the socket's cgroup.",
           ("cgroup",), "tcp:tcp_retransmit_skb", "--top-cgroups K"),
    Metric(PREFIX + "cgroup_resets_total", "counter",
           "Resets sent and received by a socket of the cgroup; a reset sent for no full socket (a closed "
           "port, TIME_WAIT) belongs to no cgroup and is counted only in tcptrace_tcp_resets_total.",
           ("cgroup", "direction"), "tcp:tcp_send_reset, tcp:tcp_receive_reset", "--top-cgroups K"),
    Metric(PREFIX + "tcp_srtt_seconds", "histogram",
           "Smoothed round-trip times, as tcp:tcp_probe reports them for every segment an established "
           "connection receives (so a busy connection weighs more: it is a per-ACK sample, as `tcptrace "
           "probe --hist rtt`). Buckets are powers of two microseconds. Not observed on kernels without "
           "the tracepoint.",
           (), "tcp:tcp_probe"),
    Metric(PREFIX + "tcp_congestion_state_transitions_total", "counter",
           "Changes of a connection's congestion state (Open, Disorder, CWR, Recovery, Loss), by old and "
           "new state, for connections that began while the exporter ran (Linux 5.19+; a call that sets "
           "the state the socket already has is not a change).",
           ("from", "to"), "tcp:tcp_cong_state_set"),
    Metric(PREFIX + "lost_events_total", "counter",
           "Events the kernel side could not count (the --top-remotes or --top-cgroups map could not take an "
           "address or a cgroup, or "
           f"more than {DROPS_BEYOND} distinct drop reasons past the kernel's table).",
           (), ""),
    Metric(PREFIX + "untracked_sockets_total", "counter",
           "Sockets whose session or connect could not be followed (no room in the per-socket map; past "
           "65536 sockets open at once the oldest are forgotten instead, uncounted).",
           (), ""),
    Metric(PREFIX + "up", "gauge", "1 when the kernel's counters were read for this scrape, else 0.", (), ""),
    Metric(PREFIX + "build_info", "gauge",
           "Always 1: tcptrace's version, the kernel release, the bcc version and how the program was built.",
           ("version", "kernel", "bcc", "build"), ""),
    Metric(PREFIX + "programs_loaded", "gauge",
           "BPF programs loaded and attached (one per tracepoint).", (), ""),
    Metric(PREFIX + "tracepoint_attached", "gauge",
           "1 for each tracepoint the exporter is attached to, 0 for one this kernel lacks.",
           ("tracepoint",), ""),
)

BY_NAME = {m.name: m for m in METRICS}


def metrics_help(width=78):
    """The metric list for --help, from METRICS."""
    lines = ["\b", "Metrics (served at http://ADDR:PORT/metrics):"]
    for m in METRICS:
        opt = f", with {m.opt_in}" if m.opt_in else ""
        lines.append(f"  {m.signature}  ({m.kind}{opt})")
        lines += textwrap.wrap(m.help, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def markdown_table():
    """The README's metrics table, from METRICS."""
    rows = ["| metric | type | labels | what | from |", "|---|---|---|---|---|"]
    for m in METRICS:
        what = m.help.replace("|", "\\|") + (f" Only with `{m.opt_in}`." if m.opt_in else "")
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        rows.append(f"| `{m.name}` | {m.kind} | {labels} | {what} | {m.source or 'tcptrace'} |")
    return "\n".join(rows)


# -- the tool declaration ----------------------------------------------------------

SET_STATE = Tracepoint("sock:inet_sock_set_state",
                       fields=("skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol",
                               "saddr", "daddr", "saddr_v6", "daddr_v6"),
                       since="4.16")

DROPS = Tracepoint("skb:kfree_skb", fields=("skbaddr", "protocol", "reason"), optional=True)
PROBE = Tracepoint("tcp:tcp_probe", fields=("sport", "dport", "srtt"), optional=True)
CONG = Tracepoint("tcp:tcp_cong_state_set", fields=("skaddr", "sport", "dport", "cong_state"), optional=True)


def drop_reasons(symbols):
    """{number: name} of the drops this kernel can report, as `tcptrace drops`
    sees them: the format's reason table past NOT_SPECIFIED."""
    table = drops.reason_table(symbols)
    skip = table.get(drops.NOT_SPECIFIED, -1)
    return {number: name for name, number in table.items() if number > skip}


def drop_slots(symbols):
    """The kernel-side array's size: every number of the format's reason
    table (its MAX included), rounded up to a power of two for SLOT()."""
    top = max(symbols.get(drops.REASON_SYMBOLS) or {0: ""})
    return 1 << top.bit_length()


def cgroup_slots(k):
    """The kernel's room for cgroups with --top-cgroups K: far more than K,
    so the busiest are among them on any host but a pathological one."""
    return min(65536, max(1024, 16 * k))


def configure(values, symbols):
    defines = {}
    if values.get("top_remotes"):
        defines["TOP_REMOTES"] = min(65536, max(1024, 16 * values["top_remotes"]))
    if values.get("top_cgroups"):
        defines["TOP_CGROUPS"] = cgroup_slots(values["top_cgroups"])
    if drops.REASON_SYMBOLS in symbols:
        defines["DROP_REASON_SLOTS"] = drop_slots(symbols)
        defines["DROPS_BEYOND"] = DROPS_BEYOND
        table = drops.reason_table(symbols)
        if drops.NOT_SPECIFIED in table:
            defines["DROP_SKIP_UPTO"] = table[drops.NOT_SPECIFIED]
    return Settings(defines=defines)


SPEC = ToolSpec(
    name="exporter",
    summary="Serve TCP metrics to Prometheus, counted in the kernel.",
    description=(
        "Serve Prometheus metrics over HTTP: TCP state changes, session lifespans and bytes, "
        "retransmits, resets and drops with the kernel's reasons, connect results, smoothed RTTs, congestion "
        "state changes, and tcptrace's own "
        "health. Series whose labels are known in advance (states, reasons, results) are served at 0 "
        "from the first scrape. "
        "Everything is counted in the kernel; a scrape reads the counters once. No label names a "
        "connection: the series are bounded whatever the traffic (remote addresses only with "
        f"--top-remotes K, at most K series per metric, K <= {MAX_TOP_REMOTES}). -L/-D count only "
        "these local/remote ports. Stop with SIGTERM or Ctrl-C; a new start attaches afresh."
    ),
    bpf="exporter.bpf.c",
    event=Layout([]),
    columns=(),
    decode=lambda values, ctx: None,
    tracepoints=(
        SET_STATE,
        Tracepoint("tcp:tcp_retransmit_skb", fields=("skaddr", "sport", "dport"), since="4.15", optional=True),
        Tracepoint("tcp:tcp_retransmit_synack", fields=("sport", "dport"), since="4.15", optional=True),
        Tracepoint("tcp:tcp_send_reset", fields=("skaddr", "saddr", "daddr"), optional=True),
        Tracepoint("tcp:tcp_receive_reset", fields=("skaddr", "sport", "dport"), optional=True),
        DROPS,
        PROBE,
        CONG,
    ),
    options=("localport", "remoteport"),
    own_options=(
        Option("listen", ("--listen",), "Where to serve /metrics: an IPv4 address or a bracketed IPv6 one, "
               "and a port.", metavar="ADDR:PORT", default=DEFAULT_LISTEN, parse=lambda v: parse_listen(v)),
        Option("top_remotes", ("--top-remotes",), "Also count per remote address and serve the K busiest "
               "(off by default: one series per address).", metavar="K", range=(1, MAX_TOP_REMOTES)),
        Option("top_cgroups", ("--top-cgroups",), "Also count sessions, connects, retransmits and resets per "
               "cgroup v2 of the socket and serve the K busiest, labelled with the container id or the cgroup "
               "path (off by default).", metavar="K", range=(1, MAX_TOP_CGROUPS)),
        Option("web_config", ("--web-config",), "Serve over TLS and/or with basic auth, as this file says "
               "(Prometheus exporter-toolkit format, as node_exporter's --web.config.file); read at start.",
               metavar="FILE"),
    ),
    configure=configure,
    btf=with_workload_btf({"tcp_sock": ("bytes_acked", "bytes_received"), "sock": ("sk_err",),
                           "sk_buff": ("head", "network_header", "sk"), "sock_common": ("skc_num",)}),
    examples=(
        Example("tcptrace exporter", f"serve on {DEFAULT_LISTEN}"),
        Example("tcptrace exporter --listen 0.0.0.0:9464", "on every IPv4 address"),
        Example("tcptrace exporter --listen [::]:9464", "on every address, v6 and v4"),
        Example("tcptrace exporter -L 443", "count only local port 443"),
        Example("tcptrace exporter --top-remotes 20", "add the 20 busiest remotes"),
        Example("tcptrace exporter --top-cgroups 50", "add the 50 busiest cgroups (containers)"),
        Example(f"curl -s http://{DEFAULT_LISTEN}/metrics", "what Prometheus reads"),
    ),
)


# -- from the kernel's bytes to numbers ---------------------------------------------


@dataclass
class Snapshot:
    """What one scrape read: plain numbers, no bcc."""

    counters: dict  # COUNTERS field -> int or list of ints, summed over the CPUs
    lost: int = 0
    untracked: int = 0
    remotes: list = field(default_factory=list)  # (address text, connections, retransmits)
    drops: dict = field(default_factory=dict)  # drop reason number -> count
    cgroups: dict = field(default_factory=dict)  # cgroup label -> CGROUP_COUNTS values


def sum_cpus(per_cpu):
    """The per-CPU copies of struct metrics, summed into {field: value}."""
    width = COUNTERS.size // 8
    total = [0] * width
    for raw in per_cpu:
        values = array.array("Q", raw[: COUNTERS.size])
        if len(values) != width:
            raise ValueError(f"a per-CPU value of {len(raw)} bytes, expected {COUNTERS.size}")
        total = [a + b for a, b in zip(total, values)]
    out = {}
    for name, ftype in COUNTERS.fields:
        start = COUNTERS.offsets[name] // 8
        count = int(ftype[4:-1]) if "[" in ftype else 0
        out[name] = total[start : start + count] if count else total[start]
    return out


def sum_drops(per_cpu, slots, beyond=()):
    """{reason number: count} of the drops array's per-CPU copies and of
    the reasons past it (the hash's (key, value) bytes); zeros left out."""
    total = [0] * slots
    for raw in per_cpu:
        values = array.array("Q", raw[: slots * 8])
        if len(values) != slots:
            raise ValueError(f"a per-CPU value of {len(raw)} bytes, expected {slots * 8}")
        total = [a + b for a, b in zip(total, values)]
    out = {reason: count for reason, count in enumerate(total) if count}
    for key, value in beyond:
        reason = int.from_bytes(key[:4], sys.byteorder)
        out[reason] = out.get(reason, 0) + int.from_bytes(value[:8], sys.byteorder)
    return out


def decode_remotes(items):
    """(address, connections, retransmits) from the remotes map's bytes."""
    out = []
    for key, value in items:
        addr, family, _unused = REMOTE_KEY.struct.unpack(key[: REMOTE_KEY.size])
        connections, retransmits = REMOTE_COUNTS.struct.unpack(value[: REMOTE_COUNTS.size])
        out.append((net.address(family, addr), connections, retransmits))
    return out


def decode_cgroups(items):
    """{cgroup id: (sessions, ...)} from the cgroups map's bytes."""
    out = {}
    for key, value in items:
        out[int.from_bytes(key[:8], sys.byteorder)] = CGROUP_COUNTS.struct.unpack(value[: CGROUP_COUNTS.size])
    return out


def top_cgroups(cgroups, k):
    """The k cgroups ({label: counts}) with the most counted, ties by label, idle ones left out."""
    ranked = sorted((item for item in cgroups.items() if sum(item[1])), key=lambda item: (-sum(item[1]), item[0]))
    return ranked[:k]


def top(remotes, index, k):
    """The k remotes with the most of one count (ties by address), zeros left out."""
    ranked = sorted((r for r in remotes if r[index]), key=lambda r: (-r[index], r[0]))
    return [(r[0], r[index]) for r in ranked[:k]]


# -- from numbers to metric families -------------------------------------------------


def _family(name, **kwargs):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    m = BY_NAME[name]
    cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}[m.kind]
    if m.kind == "histogram":
        return cls(m.name, m.help, **kwargs)
    return cls(m.name, m.help, labels=list(m.labels), **kwargs)


def histogram_buckets(slots, powers, scale):
    """Cumulative (le, count) pairs, then +Inf: bucket le=2^k holds slots 0..k."""
    from prometheus_client.utils import floatToGoString

    out = []
    for k in powers:
        out.append((floatToGoString((1 << k) * scale), sum(slots[: k + 1])))
    out.append(("+Inf", sum(slots)))
    return out


def reset_reason(slot, ctx):
    if slot == REASON_NONE:
        return "none"
    name = ctx.symbols.get(resets.REASON_SYMBOLS, {}).get(slot)
    if name:
        return name
    return "OTHER" if slot == REASON_OTHER else str(slot)


def connect_results(c):
    """{result label: count} of the connect counters, as `tcptrace connect` names them."""
    results = {}

    def add(label, count):
        if count:
            results[label] = results.get(label, 0) + count

    add("OK", c["connects_ok"])
    add(connect.result(1, 1, 0), c["connects_reset"])
    add(connect.result(1, 0, connect.ERROR_UNKNOWN), c["connects_unknown"])
    for err, count in enumerate(c["connect_errors"]):
        add("OTHER" if err == ERRNO_SLOTS - 1 else connect.result(1, 0, err), count)
    return results


def ca_states(symbols):
    """{number: name} of the congestion states: the format's own table when
    it has one, else enum tcp_ca_state (include/uapi/linux/tcp.h: a stable
    user-space interface, whose names `tcptrace probe` shows too)."""
    return dict(symbols.get(CA_SYMBOLS) or probe.CA_STATES)


def ca_transitions(slots, symbols):
    """{(from, to): count} of the kernel's ca_transitions array."""
    names = ca_states(symbols)
    out = {}
    for slot, count in enumerate(slots):
        old, new = divmod(slot, CA_SLOTS)
        key = (names.get(old, str(old)), names.get(new, str(new)))
        out[key] = out.get(key, 0) + count
    return out


def known_series(ctx, health):
    """The label values of each counter that are known before any event,
    for the tracepoints this run is attached to: {metric name: [labels]}."""
    attached = set(health["attached"])
    out = {PREFIX + "tcp_state_transitions_total": list(TRANSITIONS),
           PREFIX + "tcp_connects_total": [(r,) for r in (CONNECT_RESULTS if "sock.sk_err" in ctx.btf
                                                         else CONNECT_RESULTS_NO_BTF)]}
    if "tcp:tcp_retransmit_skb" in attached:
        out[PREFIX + "tcp_retransmits_total"] = [(s,) for s in RETRANSMIT_STATES]
    resets_known = []
    if "tcp:tcp_send_reset" in attached:
        table = ctx.symbols.get(resets.REASON_SYMBOLS)
        names = [name for number, name in sorted(table.items()) if name != SENTINEL] if table else ["none"]
        resets_known += [("sent", name) for name in names]
    if "tcp:tcp_receive_reset" in attached:
        resets_known.append(("received", "none"))
    out[PREFIX + "tcp_resets_total"] = resets_known
    if CONG.name in attached:
        names = [name for _number, name in sorted(ca_states(ctx.symbols).items()) if name != SENTINEL]
        out[PREFIX + "tcp_congestion_state_transitions_total"] = [(a, b) for a in names for b in names if a != b]
    if counts_drops(ctx, health):
        out[PREFIX + "tcp_drops_total"] = [(name,) for _number, name in sorted(drop_reasons(ctx.symbols).items())]
    return out


def counts_drops(ctx, health):
    """Whether drops are counted: the tracepoint with its reason, and the
    packet's headers (BTF) to tell TCP apart."""
    return (DROPS.name in health["attached"] and drops.REASON_SYMBOLS in ctx.symbols
            and "sk_buff.head" in ctx.btf and "sk_buff.network_header" in ctx.btf)


def counter_family(name, counts, known):
    """A counter family: the known label values first (0 until counted),
    then any other that was counted."""
    family = _family(name)
    counts = dict(counts)
    for labels in known:
        family.add_metric(list(labels), counts.pop(labels, 0))
    for labels, count in counts.items():
        if count:
            family.add_metric(list(labels), count)
    return family


def families(snapshot, ctx, health, top_remotes=0, top_cgroups_k=0):
    """Every metric family of one scrape. `health` holds the build info and
    what is attached; `snapshot` is None when the counters could not be read."""
    out = []
    up = _family(PREFIX + "up")
    up.add_metric([], 1 if snapshot is not None else 0)
    out.append(up)
    info = _family(PREFIX + "build_info")
    info.add_metric([__version__, health["kernel"], health["bcc"], health["build"]], 1)
    out.append(info)
    loaded = _family(PREFIX + "programs_loaded")
    loaded.add_metric([], len(health["attached"]))
    out.append(loaded)
    attached = _family(PREFIX + "tracepoint_attached")
    for name in health["tracepoints"]:
        attached.add_metric([name], 1 if name in health["attached"] else 0)
    out.append(attached)
    if snapshot is None:
        return out

    c = snapshot.counters
    known = known_series(ctx, health)

    def add(name, counts):
        out.append(counter_family(PREFIX + name, counts, known.get(PREFIX + name, ())))

    moves = {}
    for slot, count in enumerate(c["transitions"]):
        old, new = divmod(slot, STATE_SLOTS)
        moves[(tcpstate.name(old), tcpstate.name(new))] = count
    add("tcp_state_transitions_total", moves)

    for name, key, powers, scale in (
        ("tcp_session_duration_seconds", "duration_ns", DURATION_POWERS, 1e-9),
        ("tcp_session_sent_bytes", "tx_bytes", BYTES_POWERS, 1),
        ("tcp_session_received_bytes", "rx_bytes", BYTES_POWERS, 1),
        ("tcp_srtt_seconds", "srtt_us", SRTT_POWERS, 1e-6),
    ):
        hist = _family(PREFIX + name)
        hist.add_metric([], histogram_buckets(c[key], powers, scale), c[key + "_sum"] * scale)
        out.append(hist)

    add("tcp_retransmits_total",
        {(tcpstate.name(state) if state else "unknown",): count for state, count in enumerate(c["retransmits"])})
    synack = _family(PREFIX + "tcp_synack_retransmits_total")
    synack.add_metric([], c["synack_retransmits"])
    out.append(synack)

    resets_counted = {}
    for slot, count in enumerate(c["resets_sent"]):
        key = ("sent", reset_reason(slot, ctx))
        resets_counted[key] = resets_counted.get(key, 0) + count
    resets_counted[("received", "none")] = c["resets_received"]
    add("tcp_resets_total", resets_counted)

    add("tcp_connects_total", {(result,): count for result, count in connect_results(c).items()})

    if CONG.name in health["attached"]:
        add("tcp_congestion_state_transitions_total", ca_transitions(c["ca_transitions"], ctx.symbols))

    if counts_drops(ctx, health):
        add("tcp_drops_total", {(drops.reason_name(reason, ctx),): count for reason, count in snapshot.drops.items()})

    if top_remotes:
        for name, index in (("remote_connections_total", 1), ("remote_retransmits_total", 2)):
            remote = _family(PREFIX + name)
            for addr, count in top(snapshot.remotes, index, top_remotes):
                remote.add_metric([addr], count)
            out.append(remote)

    if top_cgroups_k:
        busiest = top_cgroups(snapshot.cgroups, top_cgroups_k)
        fields = dict(zip(CGROUP_COUNTS.names, range(len(CGROUP_COUNTS.names))))
        for name, columns in (("cgroup_sessions_total", (("sessions", ()),)),
                              ("cgroup_connects_total", (("connects_ok", ("OK",)), ("connects_failed", ("FAILED",)))),
                              ("cgroup_retransmits_total", (("retransmits", ()),)),
                              ("cgroup_resets_total", (("resets_sent", ("sent",)), ("resets_received", ("received",))))):
            family = _family(PREFIX + name)
            for label, counts in busiest:
                for column, extra in columns:
                    family.add_metric([label, *extra], counts[fields[column]])
            out.append(family)

    lost = _family(PREFIX + "lost_events_total")
    lost.add_metric([], snapshot.lost)
    out.append(lost)
    untracked = _family(PREFIX + "untracked_sockets_total")
    untracked.add_metric([], snapshot.untracked)
    out.append(untracked)
    return out


class CgroupLabels:
    """cgroup id -> the label served (the container id when the path names
    one, else the path), and which ids are gone. A cgroup whose directory is
    gone (rmdir, or its inode now another's) is gone at once; an id never
    found in the hierarchy is given `expiry` seconds (a cgroup made since
    the last walk) before it is taken as gone."""

    def __init__(self, resolver, expiry=CGROUP_EXPIRY_S, clock=time.monotonic):
        self.resolver, self.expiry, self.clock = resolver, expiry, clock
        self.unseen = {}  # id -> when it was first not found

    def _alive(self, cgroup_id, path):
        try:
            return os.stat(os.path.join(self.resolver.mount, path.lstrip("/"))).st_ino == cgroup_id
        except OSError:
            return False

    def label(self, cgroup_id):
        """(label or None, gone)."""
        path = self.resolver.resolve(cgroup_id)
        if path is not None and self._alive(cgroup_id, path):
            self.unseen.pop(cgroup_id, None)
            container, _pod = workload.container_of(path)
            return container or path, False
        if path is not None:
            return None, True  # resolved before, its directory is gone now
        first = self.unseen.setdefault(cgroup_id, self.clock())
        if self.clock() - first >= self.expiry:
            del self.unseen[cgroup_id]
            return None, True
        return None, False

    def sort(self, counts):
        """({label: summed counts}, [ids that are gone]) of {id: counts}."""
        out, gone = {}, []
        for cgroup_id, values in counts.items():
            label, is_gone = self.label(cgroup_id)
            if is_gone:
                gone.append(cgroup_id)
            elif label is not None:
                have = out.get(label)
                out[label] = tuple(a + b for a, b in zip(have, values)) if have else tuple(values)
        return out, gone


class Collector:
    """A prometheus_client collector over a loaded session: each scrape
    reads the kernel's counters once."""

    def __init__(self, session, top_remotes=0, top_cgroups=0):
        self.session = session
        self.top_remotes = top_remotes
        self.top_cgroups = top_cgroups
        self.cgroups = CgroupLabels(workload.Resolver()) if top_cgroups else None
        self.lock = threading.Lock()
        self.failed = False
        self.ctx = DecodeContext(symbols=session.ctx.symbols, btf=session.ctx.btf)
        self.health = {
            "kernel": os.uname().release,
            "bcc": session.program.bcc_version,
            "build": session.program.build_mode,
            "tracepoints": [tp.name for tp in session.spec.tracepoints],
            "attached": list(session.attached),
        }
        self.drops = counts_drops(self.ctx, self.health)
        self.drop_slots = drop_slots(self.ctx.symbols)

    def snapshot(self):
        session = self.session
        counters = sum_cpus(session.read_percpu("metrics"))
        session.read_stats()
        remotes = decode_remotes(session.read_table("remotes")) if self.top_remotes else []
        dropped = (sum_drops(session.read_percpu("drops"), self.drop_slots, session.read_table("drops_beyond"))
                   if self.drops else {})
        cgroups = self.read_cgroups() if self.top_cgroups else {}
        return Snapshot(counters, session.losses.lost, session.losses.untracked, remotes, dropped, cgroups)

    def read_cgroups(self):
        """{label: counts}; the kernel's entries of cgroups that are gone
        are deleted, which makes room and ends their series."""
        table = self.session.map("cgroups")
        by_label, gone = self.cgroups.sort(decode_cgroups(table.items()))
        delete = getattr(table, "delete", None)
        for cgroup_id in gone if delete else ():
            try:
                delete(cgroup_id.to_bytes(8, sys.byteorder))
            except OSError:
                pass  # already gone
        return by_label

    def collect(self):
        with self.lock:
            try:
                snap = self.snapshot()
                self.failed = False
            except Exception as e:  # reported once, and as tcptrace_up 0
                if not self.failed:
                    self.session.say(f"reading the kernel's counters failed: {e}")
                self.failed = True
                snap = None
        return families(snap, self.ctx, self.health, self.top_remotes, self.top_cgroups)


# -- serving -----------------------------------------------------------------------


def parse_listen(value):
    """(host, port, family) from ADDR:PORT, [IPV6]:PORT; raises ValueError."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\]:([0-9]{1,5})|([0-9.]+):([0-9]{1,5})", value or "")
    if not m:
        raise ValueError(f"expected ADDR:PORT or [IPV6]:PORT, got {value!r}")
    bracketed = bool(m.group(1))
    host, port = (m.group(1), m.group(2)) if bracketed else (m.group(3), m.group(4))
    try:
        addr = (ipaddress.IPv6Address if bracketed else ipaddress.IPv4Address)(host)
    except ValueError:
        kind = "an IPv6" if bracketed else "an IPv4"
        raise ValueError(f"{host!r} is not {kind} address") from None
    port = int(port)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return str(addr), port, 6 if addr.version == 6 else 4


def bind(host, port, version):
    """A socket bound to the address, before any BPF work, so that a port in
    use fails fast; it listens once the programs are attached (until then a
    scraper is refused, not kept waiting)."""
    import socket

    where = f"[{host}]:{port}" if version == 6 else f"{host}:{port}"
    sock = socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A restart must not wait out the last run's TIME_WAIT connections;
        # a live listener on the port still makes bind() fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TcptraceError(f"cannot listen on {where} ({e.strerror or e}): pick another with --listen.") from None
    return sock


def serve(listen, opts, top_remotes=0, err=sys.stderr):
    """Read the web config, bind, load, attach, serve until SIGINT/SIGTERM/SIGHUP;
    returns the exit status. Under systemd (Type=notify) it says READY=1 once
    /metrics serves, WATCHDOG=1 while the serving loop runs, STOPPING=1 at the end."""
    from prometheus_client import CollectorRegistry

    from . import runtime, sdnotify, webconfig

    path = (opts.tool or {}).get("web_config")
    config = webconfig.load(path) if path else webconfig.WebConfig()  # a bad file ends here: exit 2
    top_cgroups = (opts.tool or {}).get("top_cgroups") or 0
    if top_cgroups and not workload.cgroup2_mount():
        raise TcptraceError("--top-cgroups needs the cgroup v2 hierarchy, and none is mounted "
                            "(mount -t cgroup2 none /sys/fs/cgroup/unified).")
    host, port, version = listen
    sock = bind(host, port, version)
    session = runtime.Session(SPEC, opts, writer=None, err=err, buffer=False)
    server = None
    try:
        session.open()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(session, top_remotes, top_cgroups))
        server = webconfig.MetricsServer(sock, registry, config).start()
        where = f"[{host}]:{port}" if version == 6 else f"{host}:{port}"
        url = f"{server.scheme}://{where}/metrics"
        missing = [tp.name for tp in SPEC.tracepoints if tp.name not in session.attached]
        lacks = f" (this kernel lacks {', '.join(missing)})" if missing else ""
        session.announce(f"serving metrics on {url}{lacks}")
        sdnotify.notify(f"READY=1\nSTATUS=serving metrics on {url}")
        watchdog = sdnotify.watchdog_interval()
        ping_every = watchdog / 2 if watchdog else None
        next_ping = time.monotonic()
        with runtime.Stopper() as stopper:
            while not stopper.stop:
                now = time.monotonic()
                # Only a serving loop that went round lately earns the ping:
                # a hung server thread makes systemd restart the exporter.
                if ping_every and now >= next_ping and server.serving_within(ping_every):
                    sdnotify.notify("WATCHDOG=1")
                    next_ping = now + ping_every
                time.sleep(0.2)
    finally:
        sdnotify.notify("STOPPING=1")
        if server is not None:
            server.stop()
        else:
            sock.close()
        session.close()
    return EXIT_OK


__all__ = ["METRICS", "SPEC", "families", "parse_listen", "serve"]
