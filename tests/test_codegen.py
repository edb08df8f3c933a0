"""Program generation: structs from formats, integer-only defines."""

import os

import pytest

from tcptrace import codegen, layout, runtime, tracefs
from tcptrace.errors import BuildError, KernelTooOldError
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


# -- shared headers: pasted into the program text, each once -------------------------

HEADERS = ("tcptrace.h", "counting.bpf.h", "addresses.bpf.h", "owners.bpf.h", "lifecycle.bpf.h")


def fake_sources(monkeypatch, files):
    real = codegen.bpf_source
    monkeypatch.setattr(codegen, "bpf_source", lambda name: files[name] if name in files else real(name))


def test_includes_expand_recursively_and_once(monkeypatch):
    fake_sources(monkeypatch, {
        "a.bpf.h": '#include "b.bpf.h"\nint a;\n',
        "b.bpf.h": '#include "a.bpf.h"\nint b;\n',
    })
    text = codegen.expand_includes('#include "a.bpf.h"\n#include "b.bpf.h"\n  #  include "a.bpf.h"\nint tool;\n',
                                   "tool.bpf.c")
    assert text.split() == ["int", "b;", "int", "a;", "int", "tool;"]


@pytest.mark.parametrize("line,named", [
    ('#include "nowhere.bpf.h"', '"nowhere.bpf.h"'),
    ("#include <linux/tcp.h>", "<linux/tcp.h>"),
    ('#include "../tcptrace.h"', '"../tcptrace.h"'),
    ('#include "states.bpf.c"', '"states.bpf.c"'),
])
def test_an_include_that_is_not_ours_is_an_error_naming_it(line, named):
    with pytest.raises(BuildError) as caught:
        codegen.expand_includes(f"int x;\n{line}\n", "tool.bpf.c")
    assert named in str(caught.value) and "tool.bpf.c" in str(caught.value)


def test_a_missing_nested_header_names_the_header_that_includes_it(monkeypatch):
    fake_sources(monkeypatch, {"a.bpf.h": '#include "gone.bpf.h"\n'})
    with pytest.raises(BuildError, match=r'a\.bpf\.h includes "gone\.bpf\.h"'):
        codegen.expand_includes('#include "a.bpf.h"\n', "tool.bpf.c")


@pytest.mark.parametrize("tool", ["states", "accept", "connect", "life", "resets", "retrans"])
def test_every_program_holds_each_shared_header_once(tool):
    from tcptrace.tools import TOOLS

    spec = TOOLS[tool]
    text = runtime.plan(spec, runtime.RunOptions(count=True, pids=(1,)), source("6.18"), release="6.18").text
    assert "#include" not in text
    for header in HEADERS[:4]:
        opening = codegen.bpf_source(header).split("\n", 2)[1]  # " * <name>: what it holds"
        assert text.count(opening) == 1, (tool, header)
    lifecycle = codegen.bpf_source("lifecycle.bpf.h").split("\n", 2)[1]
    assert text.count(lifecycle) == (1 if tool in ("connect", "life") else 0)


def test_the_exporter_shares_the_lifecycle_of_life_and_connect():
    from tcptrace import exporter

    text = runtime.plan(exporter.SPEC, runtime.RunOptions(), source("6.18"), release="6.18").text
    assert text.count(codegen.bpf_source("lifecycle.bpf.h").split("\n", 2)[1]) == 1
    body = codegen.bpf_source(exporter.SPEC.bpf)
    for helper in ("session_begins(", "connect_begins(", "handshake_ends(", "connect_failed("):
        assert helper in body, helper


@pytest.mark.parametrize("tool", ["resets", "retrans"])
def test_counts_that_cannot_be_stored_are_lost_not_dropped(tool):
    """-c counts through count_event(), which counts a key the map cannot
    store as a lost event; the map's size is a setting."""
    from tcptrace.tools import TOOLS

    opts = runtime.RunOptions(count=True, extra={"TCPTRACE_MAX_COUNTS": 4})
    text = runtime.plan(TOOLS[tool], opts, source("6.18"), release="6.18").text
    assert "#define TCPTRACE_MAX_COUNTS 4" in text
    assert "BPF_HASH(counts, key_type, u64, TCPTRACE_MAX_COUNTS)" in text
    assert ".atomic_increment(" not in text
    assert "count_event(&key);" in codegen.bpf_source(TOOLS[tool].bpf)
    helper = text[text.index("void count_event("):]
    helper = helper[: helper.index("\n}\n")]
    assert "stat_inc(STAT_LOST_OUTPUT)" in helper
