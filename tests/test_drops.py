"""tcptrace drops without the kernel: reason tables from saved format files,
its own options, header decoding, count keys and the program generated for
every saved kernel (compiled and verified where bcc runs)."""

import io
import json
import os
import socket
import struct

import pytest
from click.testing import CliRunner
import helpers
from helpers import unwrap

from tcptrace import codegen, output, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.errors import KernelTooOldError
from tcptrace.spec import BadOption, DecodeContext
from tcptrace.tools import drops

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")
KERNELS = sorted(d for d in os.listdir(FORMATS) if os.path.isfile(os.path.join(FORMATS, d, "KERNEL_RELEASE")))


def source(kernel):
    return tracefs.FormatSource(os.path.join(FORMATS, kernel))


def symbols(kernel):
    fmt = source(kernel).load("skb:kfree_skb")
    return runtime.symbols_of({"skb:kfree_skb": fmt})


def context(kernel="6.18"):
    return DecodeContext(symbols=symbols(kernel))


def values(**kw):
    base = {"reasons": (), "all_reasons": False, "by": "reason"}
    base.update(kw)
    return base


# -- the kernel's reason tables ----------------------------------------------------

# Numbers read from the saved files: the same name has another number in
# every generation, which is why no table is compiled into tcptrace.
TABLES = {
    "6.1": {"NOT_SPECIFIED": 1, "NO_SOCKET": 2, "TCP_CSUM": 4, "NETFILTER_DROP": 7, "TCP_INVALID_SEQUENCE": 27},
    "6.18": {"NOT_SPECIFIED": 2, "NO_SOCKET": 3, "TCP_CSUM": 10, "NETFILTER_DROP": 12, "TCP_LISTEN_OVERFLOW": 40,
             "TCP_INVALID_SEQUENCE": 42, "QUEUE_PURGE": 104},
}


@pytest.mark.parametrize("kernel", sorted(TABLES))
def test_reason_tables_from_the_saved_formats(kernel):
    table = drops.reason_table(symbols(kernel))
    assert {name: table[name] for name in TABLES[kernel]} == TABLES[kernel]
    assert "MAX" not in table, "the end marker is not a reason"
    assert len(set(table.values())) == len(table)


def test_listen_overflow_is_a_reason_only_on_newer_kernels():
    assert "TCP_LISTEN_OVERFLOW" not in drops.reason_table(symbols("6.1"))
    assert "TCP_LISTEN_OVERFLOW" in drops.reason_table(symbols("6.18"))


# -- its own options ---------------------------------------------------------------

@pytest.mark.parametrize("kernel,skip,purge", [("6.1", 1, None), ("6.12", 2, 91), ("6.18", 2, 104)])
def test_default_leaves_out_what_is_not_a_drop(kernel, skip, purge):
    """NOT_SPECIFIED and before, and (where the kernel has QUEUE_PURGE, at
    its own number) a purged segment without payload."""
    settings = drops.configure(values(), symbols(kernel))
    no_socket = drops.reason_table(symbols(kernel))["NO_SOCKET"]
    expected = {"SKIP_REASONS_UPTO": skip, "REASON_NO_SOCKET": no_socket}
    if purge is not None:
        expected["SKIP_EMPTY_PURGE"] = purge
    assert settings.defines == expected
    assert settings.maps == {}


@pytest.mark.parametrize("kernel", ["6.12", "6.18"])
@pytest.mark.parametrize("given", [{"all_reasons": True}, {"reasons": ("QUEUE_PURGE",)},
                                   {"reasons": ("NO_SOCKET",)}])
def test_all_reasons_or_a_reason_list_hides_nothing(kernel, given):
    settings = drops.configure(values(**given), symbols(kernel))
    assert "SKIP_REASONS_UPTO" not in settings.defines and "SKIP_EMPTY_PURGE" not in settings.defines
    assert ("FILTER_REASONS" in settings.defines) == ("reasons" in given)


def test_the_empty_purge_filter_reaches_the_program():
    settings = drops.configure(values(), symbols("6.18"))
    text = plan("6.18", extra=settings.defines).text
    assert "#define SKIP_EMPTY_PURGE 104\n" in text
    assert "BPF_PERCPU_ARRAY(drops_hidden, u64, 1);" in text


@pytest.mark.parametrize("kernel", sorted(TABLES))
@pytest.mark.parametrize("given", [("NO_SOCKET,tcp_csum",), ("no_socket", " TCP_CSUM "),
                                   ("TCP_CSUM,NO_SOCKET,TCP_CSUM",)])
def test_reason_names_become_map_entries_of_this_kernels_numbers(kernel, given):
    settings = drops.configure(values(reasons=given), symbols(kernel))
    assert settings.defines["FILTER_REASONS"] == 1
    assert "SKIP_REASONS_UPTO" not in settings.defines
    keys = sorted(struct.unpack("=I", key)[0] for key, _value in settings.maps["filter_reasons"])
    assert keys == sorted([TABLES[kernel]["NO_SOCKET"], TABLES[kernel]["TCP_CSUM"]])
    assert all(value == b"\x01" for _key, value in settings.maps["filter_reasons"])


@pytest.mark.parametrize("given,bad", [
    (("NO_SOCKET,TCP_LISTEN_OVERFLOW",), "TCP_LISTEN_OVERFLOW"),  # a 6.18 name, not 6.1's
    (("NOSOCKET",), "NOSOCKET"),
    (("MAX",), "MAX"),
    (("NO_SOCKET;rm -rf /",), "NO_SOCKET;RM -RF /"),
])
def test_a_name_this_kernel_lacks_is_a_usage_error(given, bad):
    with pytest.raises(BadOption) as caught:
        drops.configure(values(reasons=given), symbols("6.1"))
    assert caught.value.flag == "--reason"
    message = str(caught.value)
    assert message.startswith(f"{bad} is not a drop reason of this kernel; valid: NOT_SPECIFIED, NO_SOCKET, ")
    assert "TCP_CSUM" in message and "MAX" not in message.split("valid:")[1]


def test_an_empty_reason_list_is_a_usage_error():
    with pytest.raises(BadOption, match="NAME"):
        drops.configure(values(reasons=(" , ",)), symbols("6.18"))


def test_count_by_local_port():
    assert drops.configure(values(by="lport"), symbols("6.18")).defines["COUNT_BY_LPORT"] == 1
    assert "COUNT_BY_LPORT" not in drops.configure(values(), symbols("6.18")).defines


def test_own_options_are_declared_for_the_command_layer():
    flags = {o.flags: o for o in drops.SPEC.own_options}
    assert set(flags) == {("--reason",), ("--all-reasons",), ("--by",)}
    assert flags[("--by",)].choices == ("reason", "lport") and flags[("--all-reasons",)].flag
    assert {o.dest for o in drops.SPEC.own_options} == set(values())


# -- decoding ----------------------------------------------------------------------

def ipv4(src, dst, sport, dport, flags, options=b""):
    ihl = (20 + len(options)) // 4
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 0, 0, 0x4000, 64, 6, 0, socket.inet_aton(src),
                     socket.inet_aton(dst)) + options
    return ip + struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0)


def ipv6(src, dst, sport, dport, flags):
    ip = struct.pack("!IHBB16s16s", 6 << 28, 20, 6, 64, socket.inet_pton(socket.AF_INET6, src),
                     socket.inet_pton(socket.AF_INET6, dst))
    return ip + struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0)


def event(packet, family=socket.AF_INET, **kw):
    base = {"ts_ns": 5_000_000_000, "pid": 4242, "reason": 3, "state": 1, "family": family,
                "values_known": drops.OWNER_KNOWN | drops.STATE_KNOWN, "unused": 0,
                "hdr": packet.ljust(drops.HDR_BYTES, b"\xee"), "comm": b"nginx".ljust(16, b"\0"),
                "cgroup_id": 0, "netns": 4026531840}
    base.update(kw)
    return drops.EVENT.struct.unpack(drops.EVENT.struct.pack(*(base[n] for n in drops.EVENT.names)))


# An IPv4 header with 12 bytes of options (record route): the TCP header
# starts at byte 32, where the fixed header would put it at 20.
RECORD_ROUTE = bytes([7, 11, 4]) + bytes(8) + bytes([1])


@pytest.mark.parametrize("packet,family,fields,row", [
    (ipv4("10.1.2.3", "10.9.8.7", 51234, 443, 0x02), socket.AF_INET, {},
     (4242, "nginx", 4, "10.1.2.3", 51234, "10.1.2.3:51234", "10.9.8.7", 443, "10.9.8.7:443", "ESTABLISHED", "S",
      "NO_SOCKET")),
    (ipv4("10.1.2.3", "10.9.8.7", 51234, 443, 0x18, RECORD_ROUTE), socket.AF_INET, {"reason": 42},
     (4242, "nginx", 4, "10.1.2.3", 51234, "10.1.2.3:51234", "10.9.8.7", 443, "10.9.8.7:443", "ESTABLISHED", "AP",
      "TCP_INVALID_SEQUENCE")),
    (ipv6("2001:db8::1", "2001:db8::2", 8080, 40000, 0x11), socket.AF_INET6, {"state": 12, "reason": 12},
     (4242, "nginx", 6, "2001:db8::1", 8080, "[2001:db8::1]:8080", "2001:db8::2", 40000, "[2001:db8::2]:40000",
      "NEW_SYN_RECV", "AF", "NETFILTER_DROP")),
    (ipv4("192.0.2.1", "192.0.2.2", 1, 2, 0xFF), socket.AF_INET, {"values_known": 0, "reason": 999},
     (None, None, 4, "192.0.2.1", 1, "192.0.2.1:1", "192.0.2.2", 2, "192.0.2.2:2", None, "SAFRPUEC", "999")),
], ids=["v4-syn", "v4-options", "v6", "unknown-owner-state-reason"])
def test_decode(packet, family, fields, row):
    decoded = drops.decode(event(packet, family, **fields), context())
    assert decoded[1:-5] == row
    assert decoded[:1] + decoded[-5:] == (None, None, None, None, None, 4026531840)


@pytest.mark.parametrize("flags,letters", [(0x02, "S"), (0x12, "SA"), (0x10, "A"), (0x11, "AF"), (0x04, "R"),
                                           (0x14, "AR"), (0x18, "AP"), (0x00, ""), (0xC2, "SEC")])
def test_flags(flags, letters):
    assert drops.flag_letters(flags) == letters


def test_headers_past_the_largest_ipv4_header_still_fit():
    """60 bytes of IPv4 header (all options) and 14 of TCP fit the event."""
    packet = ipv4("10.0.0.1", "10.0.0.2", 5, 6, 0x02, bytes([1]) * 40)
    assert len(packet) >= 60 + 14 and drops.HDR_BYTES >= 60 + 14
    assert drops.parse_headers(socket.AF_INET, packet[: drops.HDR_BYTES]) == ("10.0.0.1", 5, "10.0.0.2", 6, 0x02)


def test_reason_names_are_this_kernels():
    """The same number is another reason on another kernel."""
    ev = event(ipv4("10.1.2.3", "10.9.8.7", 1, 2, 2), reason=4)
    assert drops.decode(ev, context("6.1"))[-6] == "TCP_CSUM"
    assert drops.decode(ev, context("6.18"))[-6] == "SOCKET_CLOSE"
    assert drops.decode(ev, DecodeContext())[-6] == "4"


def test_decode_count():
    assert drops.decode_count((3, 0, 0), context()) == ("NO_SOCKET", None)
    assert drops.decode_count((10, 443, 0), context()) == ("TCP_CSUM", 443)
    assert drops.decode_count((500, 80, 0), context()) == ("500", 80)


def test_json_object():
    stream = io.StringIO()
    w = output.writer("json", stream, drops.COLUMNS, tool="drops")
    w.header()
    ev = event(ipv4("10.1.2.3", "10.9.8.7", 51234, 443, 0x02), values_known=0)
    w.row(ev[0], drops.decode(ev, context()))
    assert unwrap(json.loads(stream.getvalue()), "drops") == {
        "pid": None, "comm": None, "family": 4, "saddr": "10.1.2.3", "sport": 51234, "daddr": "10.9.8.7",
        "dport": 443, "state": None, "flags": "S", "reason": "NO_SOCKET", "cgroup_id": None, "cgroup": None,
        "container": None, "pod_uid": None, "netns": 4026531840}


def test_default_table_fits_80_columns():
    stream = io.StringIO()
    w = output.writer("table", stream, drops.COLUMNS)
    w.header()
    ev = event(ipv4("255.255.255.255", "255.255.255.254", 65535, 65535, 0x19), pid=4194304, reason=40)
    w.row(ev[0], drops.decode(ev, context()))
    lines = stream.getvalue().splitlines()
    assert lines[0].split() == ["PID", "SADDR:SPORT", "DADDR:DPORT", "STATE", "FLAGS", "REASON"]
    assert lines[1].split() == ["4194304", "255.255.255.255:65535", "255.255.255.254:65535", "ESTABLISHED", "AFP",
                                "TCP_LISTEN_OVERFLOW"]
    assert len(lines[0]) <= 80


# -- the program for every saved kernel ----------------------------------------------

def fixed_btf(struct_name, members):
    return helpers.fixed_btf(struct_name, members, base=100, size=2)


def plan(kernel, **opts):
    return runtime.plan(drops.SPEC, runtime.RunOptions(buffer="ring", **opts), source(kernel),
                        release=source(kernel).kernel_release(), btf_offsets=fixed_btf)


@pytest.mark.parametrize("kernel", KERNELS)
def test_program_or_refusal_naming_5_17(kernel):
    has = source(kernel).load("skb:kfree_skb")
    if has is None or not has.has("reason"):
        with pytest.raises(KernelTooOldError, match=r"skb:kfree_skb.*\(Linux 5\.17 or later has it\)\.$"):
            plan(kernel)
        return
    text = plan(kernel).text
    assert codegen.tp_struct(has) in text
    assert "int on_kfree_skb(struct tp_kfree_skb *args)" in text
    assert ("#define HAS_KFREE_SKB_RX_SK 8" in text) == has.has("rx_sk")
    for name in ("OFF_SK_BUFF_HEAD", "OFF_SK_BUFF_NETWORK_HEADER", "OFF_SK_BUFF_SK", "OFF_SOCK_COMMON_SKC_NUM",
                 "OFF_SOCK_COMMON_SKC_STATE"):
        assert f"#define {name} " in text


def test_which_saved_kernels_can_run_it():
    runs = [k for k in KERNELS if (f := source(k).load("skb:kfree_skb")) is not None and f.has("reason")]
    assert sorted(runs) == ["6.1", "6.12", "6.18"]


def test_settings_reach_the_program_as_integers():
    settings = drops.configure(values(by="lport"), symbols("6.18"))
    text = plan("6.18", count=True, extra=settings.defines).text
    assert "#define SKIP_REASONS_UPTO 2\n" in text and "#define COUNT_BY_LPORT 1\n" in text
    assert "#define REASON_NO_SOCKET 3\n" in text


def test_ebpf_refuses_a_kernel_without_reasons():
    result = CliRunner().invoke(cli, ["drops", "--ebpf", "--formats", os.path.join(FORMATS, "5.15")])
    assert result.exit_code == 7
    assert "needs field reason of skb:kfree_skb" in result.output and "Linux 5.17" in result.output


def test_help_shows_the_examples():
    result = CliRunner().invoke(cli, ["drops", "--help"])
    assert result.exit_code == 0
    assert "tcptrace drops --reason NO_SOCKET,TCP_CSUM" in result.output


# Switches of the C that the shared variants of test_kernels do not reach.
VARIANTS = {
    "default": {"extra": {"SKIP_REASONS_UPTO": 2, "REASON_NO_SOCKET": 3, "SKIP_EMPTY_PURGE": 104}},
    "count-purge": {"count": True, "extra": {"SKIP_EMPTY_PURGE": 104}, "family": 2},
    "pid-purge": {"extra": {"SKIP_EMPTY_PURGE": 104}, "pids": (1,)},  # hidden after the -p filter
    "reasons": {"extra": {"FILTER_REASONS": 1}, "pids": (1,), "lports": (80,), "family": 10},
    "count-lport": {"count": True, "extra": {"COUNT_BY_LPORT": 1, "FILTER_REASONS": 1}, "rports": (80,)},
    "perf": {"buffer": "perf"},
}


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "record"])
@pytest.mark.parametrize("kernel", ["6.1", "6.18"])
def test_every_variant_passes_the_verifier(bpf, kernel, raw, monkeypatch):
    """With this kernel's BTF: the state changes taken raw (as this kernel
    allows) and from the record (TCPTRACE_NO_RAW_TRACEPOINTS, or a kernel
    whose BTF lacks what the raw form reads)."""
    if not raw:
        monkeypatch.setenv("TCPTRACE_NO_RAW_TRACEPOINTS", "1")
    bcc, _where = runtime.find_bcc()
    for name, opts in VARIANTS.items():
        opts = dict(opts)
        buffer = opts.pop("buffer", "ring")
        p = runtime.plan(drops.SPEC, runtime.RunOptions(buffer=buffer, **opts), source(kernel),
                         release=source(kernel).kernel_release())
        assert p.raw == (("sock:inet_sock_set_state",) if raw else ())
        assert ("#define RAW_INET_SOCK_SET_STATE 1" in p.text) == raw
        program, mode = runtime.build_program(bcc, p.text, source(kernel).kernel_release(), f"drops ({name})")
        try:
            assert mode == "header-free"
            helpers.load_functions(bcc, program, drops.SPEC, p)
        finally:
            program.cleanup()
