"""tcptrace drops: every TCP segment the kernel drops, with the kernel's own
reason (skb:kfree_skb), the segment as on the wire and its socket's owner."""

import struct

from .. import net, tcpstate
from ..layout import Layout
from ..spec import (
    CGROUP_COLUMN,
    IP_COLUMN,
    RAW_STATE_CHANGE,
    RAW_STATE_CHANGE_BTF,
    WORKLOAD_COLUMNS,
    WORKLOAD_FIELDS,
    BadOption,
    Column,
    Counter,
    DecodeContext,
    Example,
    Option,
    Settings,
    ToolSpec,
    Tracepoint,
    with_workload_btf,
)
from ..workload import CGROUPS, row as workload_row  # noqa: F401 (CGROUPS: the columns' values)

REASON_SYMBOLS = "skb:kfree_skb.reason"
# The kernel's enum starts with values that are not drops: NOT_DROPPED_YET,
# CONSUMED (6.2+) and NOT_SPECIFIED, a kfree_skb() that gave no reason,
# which before the consume_skb split also meant "freed, not dropped".
NOT_SPECIFIED = "NOT_SPECIFIED"
NO_SOCKET = "NO_SOCKET"
# A dead socket's receive queue freed whole (6.12 and 6.18 name it): on a connection
# the server closed first, the peer's FIN that the socket already acted on.
# Only such segments without payload are hidden by default: nothing was lost.
QUEUE_PURGE = "QUEUE_PURGE"
SENTINEL = "MAX"  # the end of the kernel's table, never a reason

OWNER_KNOWN, STATE_KNOWN = 1, 2  # shared with drops.bpf.c
HDR_BYTES = 80
FLAG_LETTERS = ((0x02, "S"), (0x10, "A"), (0x01, "F"), (0x04, "R"), (0x08, "P"), (0x20, "U"), (0x40, "E"),
                (0x80, "C"))

EVENT = Layout(
    [
        ("ts_ns", "u64"),
        ("pid", "u32"),
        ("reason", "u32"),
        ("state", "s32"),
        ("family", "u16"),
        ("values_known", "u8"),
        ("unused", "u8"),
        ("hdr", f"u8[{HDR_BYTES}]"),
        ("comm", "char[16]"),
        *WORKLOAD_FIELDS,
    ]
)

COUNT_KEY = Layout([("reason", "u32"), ("lport", "u16"), ("unused", "u16")])

OWNER = ("sock:inet_sock_set_state",)
# "255.255.255.255:65535" is 21 characters; a bracketed IPv6 endpoint up to 47.
ENDPOINT, ENDPOINT_WIDE = 21, 47

COLUMNS = (
    CGROUP_COLUMN,
    Column("pid", "PID", 7, "d", requires=OWNER, nullable=True,
           value="pid if values_known & OWNER_KNOWN else None"),
    Column("comm", "COMM", table=False, requires=OWNER, nullable=True),
    IP_COLUMN,
    Column("saddr", "SADDR", table=False),
    Column("sport", "SPORT", table=False, type="integer"),
    Column("source", "SADDR:SPORT", ENDPOINT, wide=ENDPOINT_WIDE, json=False,
           value="net.endpoint(family, parse_headers(family, hdr)[0], parse_headers(family, hdr)[1])"),
    Column("daddr", "DADDR", table=False),
    Column("dport", "DPORT", table=False, type="integer"),
    Column("destination", "DADDR:DPORT", ENDPOINT, wide=ENDPOINT_WIDE, json=False,
           value="net.endpoint(family, parse_headers(family, hdr)[2], parse_headers(family, hdr)[3])"),
    Column("state", "STATE", 11, nullable=True, requires=("sock_common.skc_state",),
           value="tcpstate.name(state) if values_known & STATE_KNOWN else None"),
    Column("flags", "FLAGS", 5, value="flag_letters(parse_headers(family, hdr)[4])"),
    Column("reason", "REASON", value="reason_name(reason, ctx)"),
    *WORKLOAD_COLUMNS,
)

COUNT_COLUMNS = (
    Column("reason", "REASON", 24),
    Column("lport", "LPORT", 5, "d", nullable=True),
)


def reason_name(reason, ctx):
    """The running kernel's own name for a drop reason; a number its table
    lacks is shown as the number."""
    return ctx.symbols.get(REASON_SYMBOLS, {}).get(reason) or str(reason)


def flag_letters(flags):
    return "".join(letter for bit, letter in FLAG_LETTERS if flags & bit)


def parse_headers(family, hdr):
    """(saddr, sport, daddr, dport, flags) from the bytes at a packet's
    network header, which the kernel side checked to be IPv4 or IPv6 (per
    `family`) carrying TCP right after the IP header."""
    if family == net.AF_INET6:
        tcp, saddr, daddr = 40, hdr[8:24], hdr[24:40]
    else:
        # At least the 20 bytes of a header without options: a sample that
        # claims less is malformed and is read as if it had none.
        tcp, saddr, daddr = max(hdr[0] & 0x0F, 5) * 4, hdr[12:16], hdr[16:20]
    sport, dport = struct.unpack_from("!HH", hdr, tcp)
    addresses = net.ADDRESS[family]
    return addresses[saddr], sport, addresses[daddr], dport, hdr[tcp + 13]


def decode(ev, ctx: DecodeContext):
    _ts, pid, reason, state, family, known, _unused, hdr, comm, cgroup_id, netns = ev
    saddr, sport, daddr, dport, flags = parse_headers(family, hdr)
    owned = known & OWNER_KNOWN
    work = workload_row(ctx, cgroup_id, netns)
    return (
        work[0],
        pid if owned else None,
        net.COMM[comm] if owned else None,
        net.IP_VERSION[family],
        saddr,
        sport,
        net.endpoint(family, saddr, sport),
        daddr,
        dport,
        net.endpoint(family, daddr, dport),
        tcpstate.name(state) if known & STATE_KNOWN else None,
        flag_letters(flags),
        reason_name(reason, ctx),
        *work[1:],
    )


def decode_count(key, ctx: DecodeContext):
    reason, lport, _unused = key
    # Port 0 never carries TCP: it is the key of counts kept per reason only.
    return reason_name(reason, ctx), lport or None


def reason_table(symbols):
    """name -> number of the running kernel's drop reasons."""
    table = symbols.get(REASON_SYMBOLS, {})
    return {name: number for number, name in table.items() if name != SENTINEL}


def _names(values):
    out = []
    for value in values or ():
        for name in value.split(","):
            name = name.strip().upper()
            if name and name not in out:
                out.append(name)
    return out


def configure(values, symbols):
    """--reason, --all-reasons and --by, checked against this kernel's
    reason table and turned into #defines and filter_reasons entries."""
    table = reason_table(symbols)
    defines, maps = {}, {}
    wanted = _names(values.get("reasons"))
    if values.get("reasons") is not None and values.get("reasons") != () and not wanted:
        raise BadOption("--reason", "expected NAME[,NAME...], got nothing")
    if wanted:
        unknown = [n for n in wanted if n not in table]
        if unknown:
            valid = ", ".join(sorted(table, key=table.get)) or "none (this kernel's kfree_skb has no reasons)"
            raise BadOption("--reason", f"{unknown[0]} is not a drop reason of this kernel; valid: {valid}")
        defines["FILTER_REASONS"] = 1
        maps["filter_reasons"] = [(struct.pack("=I", table[n]), b"\x01") for n in wanted]
    elif not values.get("all_reasons"):
        if NOT_SPECIFIED in table:
            defines["SKIP_REASONS_UPTO"] = table[NOT_SPECIFIED]
        if QUEUE_PURGE in table:
            defines["SKIP_EMPTY_PURGE"] = table[QUEUE_PURGE]
    if NO_SOCKET in table:
        defines["REASON_NO_SOCKET"] = table[NO_SOCKET]
    if values.get("by") == "lport":
        defines["COUNT_BY_LPORT"] = 1
    return Settings(defines=defines, maps=maps)


SPEC = ToolSpec(
    name="drops",
    summary="Trace TCP segments the kernel drops, with the kernel's reason.",
    description=(
        "Trace every TCP segment the kernel drops (skb:kfree_skb), with the kernel's own name for "
        "why: NO_SOCKET, TCP_CSUM, NETFILTER_DROP, TCP_INVALID_SEQUENCE, ... The names and their "
        "numbers come from the running kernel's format file, so they are the ones this kernel "
        "uses; a number its table lacks is shown as the number. SADDR:SPORT and DADDR:DPORT are the "
        "segment's as on the wire, FLAGS its TCP flags (S A F R P U E C). PID and COMM are the "
        "owner of the socket it belonged to (the receiving socket on kernels whose tracepoint has "
        "rx_sk, the sending one on the way out, else the listener on the local port), blank when "
        "unknown or when no socket wanted it; STATE is that socket's. The local port (-L, --by "
        "lport) is the destination port of a received segment and the source port of one this "
        "host was sending. NOT_SPECIFIED and the values before it are not drops, nor is a "
        "QUEUE_PURGE of a segment without payload (the FIN of a connection the server closed "
        "first, freed with its dead socket): both are left out unless --all-reasons or --reason "
        "names them. With -c, counts per reason (and local port with --by lport) "
        "are kept in the kernel and printed at exit and every -i SECONDS."
    ),
    bpf="drops.bpf.c",
    event=EVENT,
    columns=COLUMNS,
    decode=decode,
    tracepoints=(
        Tracepoint("skb:kfree_skb", fields=("skbaddr", "protocol", "reason"), since="5.17"),
        Tracepoint("sock:inet_sock_set_state", fields=("skaddr", "oldstate", "newstate", "sport", "protocol"),
                   since="4.16", optional=True, raw=RAW_STATE_CHANGE),
    ),
    options=("pid", "localport", "remoteport", "ipv4", "ipv6", "time", "timestamp", "wide", "count",
             "interval", "top"),
    hidden=(("drops_hidden", "QUEUE_PURGE segments without payload left out: no data was lost "
             "(--all-reasons shows them)"),),
    own_options=(
        Option("reasons", ("--reason",), "Only these drop reasons, as this kernel names them "
               "(checked in the kernel).", metavar="NAME[,NAME...]", multiple=True),
        Option("all_reasons", ("--all-reasons",), "Also NOT_SPECIFIED and the values before it, and "
               "QUEUE_PURGE segments without payload, which are not drops.", flag=True, default=False),
        Option("by", ("--by",), "With -c: count per reason, or per reason and local port.",
               choices=("reason", "lport"), default="reason", goes_with="count"),
    ),
    configure=configure,
    btf=with_workload_btf({"sk_buff": ("head", "network_header", "sk"), "sock_common": ("skc_num", "skc_state")},
                          RAW_STATE_CHANGE_BTF),
    counter=Counter(key=COUNT_KEY, columns=COUNT_COLUMNS, decode=decode_count),
    notes=(
        "Needs the kernel's BTF (/sys/kernel/btf/vmlinux) for the packet headers. Only a TCP "
        "header right after the IPv6 header is read (no extension headers), and only the first "
        "fragment of an IPv4 packet. A full accept queue is not a drop on every kernel: see the "
        "documentation. The listener fallback for the owner matches by port only, in any network "
        "namespace. JSON keys: pid, comm, family, saddr, sport, daddr, dport, state, flags, reason; "
        "with -c: reason, lport, count."
    ),
    examples=(
        Example("tcptrace drops", "trace TCP drops with the kernel's reason"),
        Example("tcptrace drops --reason NO_SOCKET,TCP_CSUM", "only these reasons"),
        Example("tcptrace drops -L 443", "only drops on local port 443"),
        Example("tcptrace drops -c", "count per reason in the kernel until Ctrl-C"),
        Example("tcptrace drops -c --by lport -i 5 --top 10", "the 10 busiest reasons and ports every 5 s"),
        Example("tcptrace drops -o json | jq .reason", "one JSON object per drop"),
    ),
)
