"""Program generation: structs from formats, integer-only defines."""

import os

import pytest

from tcptrace import codegen, layout, runtime, tracefs
from tcptrace.errors import KernelTooOldError
from tcptrace.spec import Tracepoint
from tcptrace.tools import states

FORMATS = os.path.join(os.path.dirname(__file__), "data", "formats")


def source(kernel, hidden=()):
    return tracefs.FormatSource(os.path.join(FORMATS, kernel), hidden)


def test_struct_for_6_18_send_reset():
    text = codegen.tp_struct(source("6.18").load("tcp:tcp_send_reset"))
    assert text.splitlines() == [
        "struct tp_tcp_send_reset {",
        "\t__u8 __common[8];",
        "\t__u64 skbaddr;",
        "\t__u64 skaddr;",
        "\t__s32 state;",
        "\t__u32 reason;",
        "\t__u8 saddr[28];",
        "\t__u8 daddr[28];",
        "};",
    ]


def test_struct_parses_back_to_format_offsets():
    fmt = source("6.1").load("tcp:tcp_retransmit_skb")
    parsed = layout.Layout(layout.parse_c_struct(codegen.tp_struct(fmt), "tp_tcp_retransmit_skb"))
    for field in fmt.fields:
        if not field.name.startswith("common_"):
            assert parsed.offsets[field.name] == field.offset


def test_padding_inserted_for_gaps():
    fmt = source("6.18").load("tcp:tcp_destroy_sock")  # sock_cookie at 64 after daddr_v6 ends at 62
    text = codegen.tp_struct(fmt)
    assert "__u8 __pad62[2];" in text and "__u64 sock_cookie;" in text


def test_has_macros_give_sizes():
    text = codegen.has_macros(source("6.18").load("tcp:tcp_send_reset"))
    assert "#define HAVE_TCP_SEND_RESET 1" in text
    assert "#define HAS_TCP_SEND_RESET_SADDR 28" in text
    assert "HAS_TCP_SEND_RESET_SPORT" not in text


def test_define_accepts_integers_only():
    assert codegen.define("FILTER_FAMILY", 10) == "#define FILTER_FAMILY 10"
    assert codegen.define("X", True) == "#define X 1"
    for bad in ("80", 1.5, None, b"1"):
        with pytest.raises(TypeError):
            codegen.define("X", bad)
    for name in ("x", "A B", "A;B", "A\nB", "1A", ""):
        with pytest.raises(ValueError):
            codegen.define(name, 1)


def test_missing_tracepoint_names_kernel_version():
    with pytest.raises(KernelTooOldError, match=r"sock:inet_sock_set_state.*Linux 4.16"):
        codegen.resolve(states.SPEC, source("6.18", hidden=["sock:inet_sock_set_state"]))


def test_missing_field_names_it(tmp_path):
    text = open(os.path.join(FORMATS, "6.18", "sock", "inet_sock_set_state.format")).read()
    text = "\n".join(l for l in text.splitlines() if "protocol;" not in l)
    (tmp_path / "sock").mkdir()
    (tmp_path / "sock" / "inet_sock_set_state.format").write_text(text)
    with pytest.raises(KernelTooOldError, match="field protocol of sock:inet_sock_set_state"):
        codegen.resolve(states.SPEC, tracefs.FormatSource(str(tmp_path)))


def test_optional_tracepoint_reported_missing():
    from dataclasses import replace

    spec = replace(states.SPEC, tracepoints=states.SPEC.tracepoints + (
        Tracepoint("tcp:tcp_bad_csum", optional=True),))
    formats, missing = codegen.resolve(spec, source("6.18", hidden=["tcp:tcp_bad_csum"]))
    assert "sock:inet_sock_set_state" in formats
    assert [(tp.name, why) for tp, why in missing] == [("tcp:tcp_bad_csum", "tracepoint absent")]


def test_plan_defines_from_options():
    opts = runtime.RunOptions(family=2, lports=(80,), buffer="perf", extended=True)
    plan = runtime.plan(states.SPEC, opts, source("6.18"), release="6.18.0")
    assert plan.use_ring is False
    assert "#define FILTER_FAMILY 2" in plan.text and "#define TCPTRACE_EXTENDED 1" in plan.text
    assert "TCPTRACE_RINGBUF" not in plan.text.split("tcptrace.h")[0]
    ring = runtime.plan(states.SPEC, runtime.RunOptions(buffer="ring", buffer_pages=64), source("6.1"),
                        release="6.1")
    assert "#define TCPTRACE_RINGBUF 1" in ring.text and "#define TCPTRACE_RINGBUF_PAGES 64" in ring.text


def test_program_has_no_kernel_includes():
    plan = runtime.plan(states.SPEC, runtime.RunOptions(), source("6.18"), release="6.18")
    assert "#include" not in plan.text
