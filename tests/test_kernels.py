"""Kernel portability: every registered tool against the saved tracepoint
formats of every kernel in tests/data/formats (real ones read from running
kernels, others derived from kernel sources: see its README.md).

Each tool either gets a program whose tracepoint structs sit exactly where
the format says, or a KernelTooOldError naming what is missing and the
Linux version that has it. Where bcc runs (privileged), every one of those
programs is compiled too: the variant a kernel gets is the one that ships.
"""

import importlib.util
import os
import re

import pytest

from tcptrace import codegen, headers, runtime, tracefs
from tcptrace.errors import BuildError, KernelTooOldError
from tcptrace.tools import TOOLS

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")
KERNELS = sorted(
    (d for d in os.listdir(FORMATS) if os.path.isfile(os.path.join(FORMATS, d, "KERNEL_RELEASE"))),
    key=lambda d: (headers.version_triple(d), d),
)
SPECS = sorted(TOOLS.values(), key=lambda s: s.name)
TOO_OLD = re.compile(
    r"^tcptrace \S+ needs (the tracepoint \S+, which this kernel does not have|field \S+( or \S+)* of \S+, "
    r"which this kernel's format lacks) \(Linux \d+\.\d+ or later has it\)\.$"
)


def load_derive():
    spec = importlib.util.spec_from_file_location("derive", os.path.join(FORMATS, "derive.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixed_btf(struct_name, members):
    return {m: (1600 + 8 * i, 8) for i, m in enumerate(sorted(members))}


def no_btf(struct_name, members):
    return None


def source(kernel):
    return tracefs.FormatSource(os.path.join(FORMATS, kernel))


def release(kernel):
    return source(kernel).kernel_release()


def options(kernel):
    # The buffer the tool would pick on that kernel, not on this one.
    ring = headers.version_triple(release(kernel)) >= (5, 8, 0)
    return runtime.RunOptions(buffer="ring" if ring else "perf")


def plan_or_error(spec, kernel, btf_offsets):
    try:
        return runtime.plan(spec, options(kernel), source(kernel), release=release(kernel),
                            btf_offsets=btf_offsets), None
    except KernelTooOldError as e:
        return None, str(e)


@pytest.mark.parametrize("btf_offsets", [fixed_btf, no_btf], ids=["btf", "no-btf"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_program_or_clear_refusal(spec, kernel, btf_offsets):
    plan, error = plan_or_error(spec, kernel, btf_offsets)
    if error:
        assert TOO_OLD.match(error), error
        return
    for name, fmt in plan.formats.items():
        generated = codegen.tp_layout(fmt)
        for field in fmt.fields:
            if not field.name.startswith("common_"):
                assert generated.offsets[field.name] == field.offset, (kernel, name, field.name)
        assert codegen.tp_struct(fmt) in plan.text
    for tp in spec.tracepoints:
        assert (tp.name in plan.formats) != any(m.name == tp.name for m, _why in plan.missing)
    if btf_offsets is fixed_btf:
        for struct_name, members in spec.btf.items():
            for member in members:
                assert f"#define OFF_{struct_name.upper()}_{member.upper()} " in plan.text
    else:
        assert "#define OFF_" not in plan.text
    assert ("#define TCPTRACE_RINGBUF 1" in plan.text) == (options(kernel).buffer == "ring")


def test_every_tool_refusal_names_a_version():
    """A tool that cannot run on a kernel says which Linux has what it needs."""
    for spec in SPECS:
        for tp in spec.tracepoints:
            if not tp.optional:
                assert re.match(r"^\d+\.\d+$", tp.since), (spec.name, tp.name)


# -- the saved formats themselves --------------------------------------------------

# kernel -> (state in tcp_event_sk_skb, family in tcp events, protocol size)
FACTS = {
    "4.19": (False, False, 1),
    "5.4": (True, False, 1),
    "5.10": (True, False, 2),
    "5.15": (True, True, 2),
    "6.1": (True, True, 2),
    "6.8": (True, True, 2),
    "6.18": (True, True, 2),
}


@pytest.mark.parametrize("kernel", sorted(FACTS))
def test_saved_formats_carry_each_kernels_changes(kernel):
    state, family, protocol = FACTS[kernel]
    src = source(kernel)
    retransmit = src.load("tcp:tcp_retransmit_skb")
    assert retransmit.has("state") is state
    for name in ("tcp:tcp_retransmit_skb", "tcp:tcp_receive_reset", "tcp:tcp_destroy_sock",
                 "tcp:tcp_retransmit_synack", "tcp:tcp_probe"):
        assert src.load(name).has("family") is family, name
    assert src.load("sock:inet_sock_set_state").field("protocol").size == protocol
    # tcp_send_reset lost its ports for sockaddrs and gained a reason in 6.10.
    assert src.load("tcp:tcp_send_reset").has("sport") is (kernel != "6.18")
    assert src.load("tcp:tcp_send_reset").has("reason") is (kernel == "6.18")


def test_4_19_addresses_sit_at_odd_offsets():
    """A one-byte protocol leaves saddr at 31: the generated struct must
    place it there without padding."""
    fmt = source("4.19").load("sock:inet_sock_set_state")
    assert [(f.name, f.offset) for f in fmt.fields if f.offset >= 30] == [
        ("protocol", 30), ("saddr", 31), ("daddr", 35), ("saddr_v6", 39), ("daddr_v6", 55)]
    assert codegen.tp_layout(fmt).offsets["saddr_v6"] == 39
    assert "__u8 saddr[4];" in codegen.tp_struct(fmt)


def test_expression_sized_arrays_parse():
    probe = source("5.15").load("tcp:tcp_probe")
    assert probe.field("saddr").size == 28 and probe.field("saddr").ctype == "__u8"
    assert probe.field("sport").offset == 64 and probe.field("sock_cookie").offset == 112


def test_derivation_reproduces_the_real_6_1_files():
    """The method behind the derived sets, checked against formats read from
    a running 6.1 kernel: every line but the event ID must match."""
    derive = load_derive()
    derived = derive.derive(derive.CHECK["6.1"])
    assert len(derived) == 7
    for path, text in derived.items():
        with open(os.path.join(FORMATS, "6.1", path + ".format")) as f:
            real = f.read()
        strip = lambda t: [line for line in t.splitlines() if not line.startswith("ID:")]  # noqa: E731
        assert strip(text) == strip(real), path


def test_derived_sets_are_what_derive_writes():
    assert load_derive().check() == []


# -- compiled with bcc (privileged) ------------------------------------------------


# Option sets that switch different code paths on: filters, count mode, the
# perf buffer, extended columns, --failed (where a tool compiles it).
VARIANTS = {
    "plain": runtime.RunOptions(),
    "filtered": runtime.RunOptions(family=10, pids=(1,), lports=(443,), rports=(8443,), extended=True),
    "count": runtime.RunOptions(count=True, pids=(1,), lports=(443,), family=2),
    "perf": runtime.RunOptions(buffer="perf", extra={"FILTER_FAILED": 1}),
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_variant_passes_the_verifier(bpf, kernel):
    """Every tool's program for every saved kernel's formats, in every option
    variant, compiled header-free and loaded into this kernel. Compiling is
    not enough: the verifier refuses some valid C (a record read through a
    derived pointer), and which C is compiled depends on the HAS_ macros."""
    bcc, _where = runtime.find_bcc()
    loaded = 0
    for spec in SPECS:
        for name, opts in VARIANTS.items():
            if opts.count and not spec.counter:
                continue
            # Without BTF only the byte reads drop out: one variant shows it.
            for btf_offsets in (fixed_btf, no_btf) if (spec.btf and name == "plain") else (fixed_btf,):
                try:
                    plan = runtime.plan(spec, opts, source(kernel), release=release(kernel),
                                        btf_offsets=btf_offsets)
                except KernelTooOldError:
                    continue
                what = f"{spec.name} ({name}) for {kernel}"
                try:
                    program, mode = runtime.build_program(bcc, plan.text, release(kernel), what)
                except BuildError:
                    # A variant the C refuses on purpose (#error: e.g. --failed
                    # on a kernel whose tracepoint lacks the field it needs).
                    assert "FILTER_FAILED" in plan.text, what
                    continue
                try:
                    assert mode == "header-free"
                    for tp in spec.tracepoints:
                        if tp.name in plan.formats:
                            program.load_func(tp.function.encode(), bcc.BPF.TRACEPOINT)
                    loaded += 1
                finally:
                    program.cleanup()
    assert loaded > 0
