"""Checks every registered tool passes, whatever it traces: its C event
struct matches its Python layout, its program generates for the saved
kernels' formats, its decoder survives any sample, its help has examples."""

import os
import random
import re

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from tcptrace import codegen, layout, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.errors import KernelTooOldError
from tcptrace.spec import DecodeContext
from tcptrace.tools import TOOLS

FORMATS = os.path.join(os.path.dirname(__file__), "data", "formats")
KERNELS = sorted(d for d in os.listdir(FORMATS) if os.path.isdir(os.path.join(FORMATS, d)))
SPECS = sorted(TOOLS.values(), key=lambda s: s.name)
ids = [s.name for s in SPECS]


def fake_btf(struct_name, members):
    return {m: (1000 + 8 * i, 8) for i, m in enumerate(sorted(members))}


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_event_struct_in_sync(spec):
    source = codegen.bpf_source(spec.bpf)
    assert layout.parse_c_struct(source, "event") == spec.event.fields
    assert spec.event.fields[0] == ("ts_ns", "u64"), "the runtime orders and times events by the first field"


@pytest.mark.parametrize("spec", [s for s in SPECS if s.counter], ids=[s.name for s in SPECS if s.counter])
def test_count_key_in_sync(spec):
    source = codegen.bpf_source(spec.bpf)
    assert layout.parse_c_struct(source, "count_key") == spec.counter.key.fields


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_program_generates_for_saved_kernels(spec, kernel):
    source = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    opts = runtime.RunOptions(lports=(80,), rports=(443,), family=10)
    for btf_offsets in (fake_btf, lambda s, m: None):
        try:
            plan = runtime.plan(spec, opts, source, release=kernel, btf_offsets=btf_offsets)
        except KernelTooOldError as e:
            assert "Linux" in str(e) or "kernel" in str(e)
            continue
        text = plan.text
        for tp in spec.tracepoints:
            if tp.name in plan.formats:
                assert f"int {tp.function}(struct tp_{tp.event} *args)" in text
        assert "#define FILTER_FAMILY 10" in text and "#define FILTER_LPORTS 1" in text
        assert '#include "tcptrace.h"' not in text


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_help_has_examples(spec):
    result = CliRunner().invoke(cli, [spec.name, "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output
    for example in spec.examples:
        assert example.command in result.output


def _ctx(spec):
    return DecodeContext(symbols={}, wide=True, extended=True)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_decode_never_raises(spec, data):
    """Any sample of the event's size decodes to a row of the right length."""
    raw = data.draw(st.binary(min_size=spec.event.size, max_size=spec.event.size))
    values = spec.event.struct.unpack(raw)
    row = spec.decode(values, _ctx(spec))
    if row is not None:
        assert len(row) == len(spec.columns)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_decoded_rows_format_in_every_output(spec):
    import io

    from tcptrace import output

    rng = random.Random(7)
    for kind in output.FORMATS:
        stream = io.StringIO()
        w = output.writer(kind, stream, spec.columns, show_time=True, show_timestamp=True, wide=True,
                          extended=True)
        w.header()
        for _ in range(50):
            raw = bytes(rng.randrange(256) for _ in range(spec.event.size))
            values = spec.event.struct.unpack(raw)
            row = spec.decode(values, _ctx(spec))
            if row is not None:
                w.row(values[0], row)
        assert stream.getvalue()


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_bpf_source_names_its_tracepoints(spec):
    """Each .bpf.c opens with a comment naming what it traces."""
    source = codegen.bpf_source(spec.bpf)
    head = source.split("*/", 1)[0]
    assert head.lstrip().startswith("/*")
    for tp in spec.tracepoints:
        assert tp.name in source or tp.event in source
    assert not re.search(r"\bk(ret)?probe__|attach_k(ret)?probe|SEC\(\"(k|f)", source)
