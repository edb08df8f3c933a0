"""Kernel portability: every registered tool against the saved tracepoint
formats of every kernel in tests/data/formats (real ones read from running
kernels, others derived from kernel sources: see its README.md).

Each tool either gets a program whose tracepoint structs sit exactly where
the format says, or a KernelTooOldError naming what is missing and the
Linux version that has it. Where bcc runs (privileged), every one of those
programs is compiled too: the variant a kernel gets is the one that ships.
"""

import dataclasses
import importlib.util
import json
import os
import re

import helpers
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
    return helpers.fixed_btf(struct_name, members)


def no_btf(struct_name, members):
    return None


def btf_facts(kernel):
    """{struct: {member: [offset, size]}} read from that kernel's BTF
    (tests/kernel/harvest.py), or None for a set derived from sources."""
    path = os.path.join(FORMATS, kernel, "btf.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def saved_btf(kernel):
    """btf_offsets as that kernel's own BTF answers it."""
    facts = btf_facts(kernel)

    def offsets(struct_name, members):
        assert struct_name in facts, f"{kernel}/btf.json lacks struct {struct_name}: harvest it again"
        return {m: tuple(facts[struct_name][m]) for m in members if m in facts[struct_name]}

    offsets.kernel = kernel
    return offsets


REAL = [k for k in KERNELS if btf_facts(k) is not None]


def source(kernel):
    return tracefs.FormatSource(os.path.join(FORMATS, kernel))


def release(kernel):
    return source(kernel).kernel_release()


def own_defaults(spec, opts):
    """opts with the tool's own options as a command line without them
    gives them (cli.own_option: a repeatable one is empty, a switch off)."""
    given = {o.dest: () if o.multiple else (False if o.flag else o.default) for o in spec.own_options}
    return dataclasses.replace(opts, tool={**given, **opts.tool})


def options(kernel, spec):
    # The buffer the tool would pick on that kernel, not on this one.
    ring = headers.version_triple(release(kernel)) >= (5, 8, 0)
    return own_defaults(spec, runtime.RunOptions(buffer="ring" if ring else "perf"))


def plan_or_error(spec, kernel, btf_offsets):
    try:
        return runtime.plan(spec, options(kernel, spec), source(kernel), release=release(kernel),
                            btf_offsets=btf_offsets), None
    except KernelTooOldError as e:
        return None, str(e)


@pytest.mark.parametrize("btf_offsets", ["btf", "no-btf", "own-btf"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_program_or_clear_refusal(spec, kernel, btf_offsets):
    """"own-btf": the offsets that kernel's BTF gave (sets read from a
    running kernel); a derived set has none, and gets made-up ones."""
    own = btf_offsets == "own-btf" and kernel in REAL
    btf_offsets = {"btf": fixed_btf, "no-btf": no_btf}.get(btf_offsets) or (saved_btf(kernel) if own else fixed_btf)
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
    if own:
        facts = btf_facts(kernel)
        for struct_name, members in spec.btf.items():
            for member in members:
                define = f"#define OFF_{struct_name.upper()}_{member.upper()} "
                if member in facts[struct_name]:
                    assert f"{define}{facts[struct_name][member][0]}\n" in plan.text
                else:  # a member this kernel lacks: the program must do without it
                    assert define not in plan.text
    elif btf_offsets is fixed_btf:
        for struct_name, members in spec.btf.items():
            for member in members:
                assert f"#define OFF_{struct_name.upper()}_{member.upper()} " in plan.text
    else:
        assert "#define OFF_" not in plan.text
    assert ("#define TCPTRACE_RINGBUF 1" in plan.text) == (options(kernel, spec).buffer == "ring")


def test_every_tool_refusal_names_a_version():
    """A tool that cannot run on a kernel says which Linux has what it needs."""
    for spec in SPECS:
        for tp in spec.tracepoints:
            if not tp.optional:
                assert re.match(r"^\d+\.\d+$", tp.since), (spec.name, tp.name)


# -- the saved formats themselves --------------------------------------------------

# kernel -> (state in tcp_event_sk_skb, family in tcp events, protocol size,
# sockaddrs and a reason in tcp_send_reset (6.10), err in tcp_retransmit_skb)
FACTS = {
    "4.19": (False, False, 1, False, False),
    "5.4": (True, False, 1, False, False),
    "5.10": (True, False, 2, False, False),
    "5.15": (True, True, 2, False, False),
    "6.1": (True, True, 2, False, False),
    "6.8": (True, True, 2, False, False),
    "6.12": (True, True, 2, True, False),
    "6.18": (True, True, 2, True, True),
}


def test_every_saved_kernel_has_its_facts():
    assert set(FACTS) == set(KERNELS)


@pytest.mark.parametrize("kernel", sorted(FACTS))
def test_saved_formats_carry_each_kernels_changes(kernel):
    state, family, protocol, new_reset, err = FACTS[kernel]
    src = source(kernel)
    retransmit = src.load("tcp:tcp_retransmit_skb")
    assert retransmit.has("state") is state
    assert retransmit.has("err") is err
    for name in ("tcp:tcp_retransmit_skb", "tcp:tcp_receive_reset", "tcp:tcp_destroy_sock",
                 "tcp:tcp_retransmit_synack", "tcp:tcp_probe"):
        assert src.load(name).has("family") is family, name
    assert src.load("sock:inet_sock_set_state").field("protocol").size == protocol
    reset = src.load("tcp:tcp_send_reset")
    assert reset.has("sport") is not new_reset
    assert reset.has("reason") is new_reset
    if new_reset:
        assert reset.field("saddr").size == reset.field("daddr").size == 28


# The tracepoints of the newer tools (probe, drops, top, congestion and error
# events) in every set read from a running kernel; sock_send_length and
# sock_recv_length came in Linux 6.3.
NEWER_TRACEPOINTS = ("tcp:tcp_probe", "skb:kfree_skb", "tcp:tcp_cong_state_set", "tcp:tcp_bad_csum",
                     "sock:inet_sk_error_report")
LENGTHS = ("sock:sock_send_length", "sock:sock_recv_length")


@pytest.mark.parametrize("kernel", REAL)
def test_real_sets_hold_the_newer_tracepoints(kernel):
    src = source(kernel)
    have = headers.version_triple(kernel)
    for name in NEWER_TRACEPOINTS:
        assert src.load(name) is not None, (kernel, name)
    for name in LENGTHS:
        assert (src.load(name) is not None) is (have >= (6, 3, 0)), (kernel, name)
    # The drop reason, named by the kernel's own table; the receiving socket from 6.11.
    drop = src.load("skb:kfree_skb")
    assert drop.has("rx_sk") is (have >= (6, 11, 0))
    assert "NO_SOCKET" in drop.symbols["reason"].values()


@pytest.mark.parametrize("kernel", REAL)
def test_real_sets_hold_btf_facts_for_every_program(kernel):
    """A set read from a running kernel carries its BTF facts for every
    struct a program reads (all its members: one a tool asks for may be
    missing, when the tool asks for each of two alternatives)."""
    from tcptrace import doctor
    from tcptrace.programs import PROGRAMS

    facts = btf_facts(kernel)
    for spec in PROGRAMS.values():
        for struct_name in doctor.btf_wanted(spec):
            assert struct_name in facts, (kernel, spec.name, struct_name)
    # What the byte columns read moves between kernels, and is never 0.
    assert 0 < facts["tcp_sock"]["bytes_acked"][0] and facts["tcp_sock"]["bytes_acked"][1] == 8


def test_btf_facts_differ_between_real_kernels():
    """The reason offsets come from each kernel: tcp_sock is laid out anew."""
    where = {k: tuple(btf_facts(k)["tcp_sock"]["bytes_acked"]) for k in REAL}
    assert len(set(where.values())) == len(where), where
    assert {"6.1", "6.12", "6.18"} <= set(REAL)


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
                    plan = runtime.plan(spec, own_defaults(spec, opts), source(kernel), release=release(kernel),
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
                    helpers.load_functions(bcc, program, spec, plan)
                    loaded += 1
                finally:
                    program.cleanup()
    assert loaded > 0
