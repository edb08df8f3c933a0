"""Checks every registered tool passes, whatever it traces: its C event
struct matches its Python layout, its program generates for the saved
kernels' formats, its decoder survives any sample, its help has examples."""

import csv
import io
import json
import os
import random
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from events import make_event
from helpers import must_run
from tcptrace import codegen, exporter, layout, output, runtime, tracefs
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


def _shared_structs():
    """(id, .bpf.c file, C struct name, Layout, is a map key) for every struct
    both sides declare: each tool's event and count key, and the exporter's."""
    out = []
    for spec in SPECS:
        out.append((f"{spec.name}.event", spec.bpf, "event", spec.event, False))
        if spec.counter:
            out.append((f"{spec.name}.count_key", spec.bpf, "count_key", spec.counter.key, True))
    out += [
        ("exporter.metrics", exporter.SPEC.bpf, "metrics", exporter.COUNTERS, False),
        ("exporter.remote_key", exporter.SPEC.bpf, "remote_key", exporter.REMOTE_KEY, True),
        ("exporter.remote_counts", exporter.SPEC.bpf, "remote_counts", exporter.REMOTE_COUNTS, False),
    ]
    return out


SHARED = _shared_structs()


@pytest.mark.parametrize("bpf,struct_name,py_layout,is_key", [s[1:] for s in SHARED], ids=[s[0] for s in SHARED])
def test_struct_in_sync(bpf, struct_name, py_layout, is_key):
    """The C struct and the Python layout: the same fields in the same order,
    each of the same type, so at the same offset, and the same size."""
    c_layout = layout.Layout(layout.parse_c_struct(codegen.bpf_source(bpf), struct_name))
    assert c_layout.describe() == py_layout.describe()
    assert c_layout.size == py_layout.size
    if is_key:
        # The kernel hashes every byte of a key, padding included, and
        # padding is whatever the stack held: one flow would count apart.
        assert py_layout.size == sum(_field_size(t) for _n, t in py_layout.fields), py_layout.describe()


def _field_size(ftype):
    base, _, count = ftype.partition("[")
    size = 1 if base == "char" else layout.SCALARS[base][0]
    return size * int(count.rstrip("]") or 1)


def test_layout_offsets_are_a_c_compilers():
    """Layout computes C's natural alignment itself; a C compiler (the BPF
    target lays these types out as x86-64 and arm64 do) holds it to that."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        if must_run():
            pytest.fail("no C compiler (cc) to check struct offsets against")
        pytest.skip("no C compiler (cc) to check struct offsets against")
    lines = ["#include <stddef.h>", "_Static_assert(_Alignof(unsigned long long) == 8, \"u64 aligned as in BPF\");"]
    lines += [f"typedef {c} {t};" for t, c in (("u8", "unsigned char"), ("u16", "unsigned short"),
                                                ("u32", "unsigned int"), ("u64", "unsigned long long"),
                                                ("s8", "signed char"), ("s16", "short"), ("s32", "int"),
                                                ("s64", "long long"))]
    for i, (name, _bpf, _struct, py_layout, _key) in enumerate(SHARED):
        tag = f"s{i}"
        members = []
        for field, ftype in py_layout.fields:
            base, _, count = ftype.partition("[")
            members.append(f"{base} {field}{'[' + count if count else ''};")
        lines.append(f"struct {tag} {{ {' '.join(members)} }};")
        for field, _ftype, offset in py_layout.describe():
            lines.append(f'_Static_assert(offsetof(struct {tag}, {field}) == {offset}, "{name}.{field} at {offset}");')
        lines.append(f'_Static_assert(sizeof(struct {tag}) == {py_layout.size}, "{name} of {py_layout.size} bytes");')
    result = subprocess.run([compiler, "-fsyntax-only", "-std=c11", "-x", "c", "-"], input="\n".join(lines) + "\n",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_event_starts_with_its_time(spec):
    assert spec.event.fields[0] == ("ts_ns", "u64"), "the runtime orders and times events by the first field"


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


def _records(kind, text):
    """How many records a reader of that format finds in the text."""
    if kind == "csv":
        return len(list(csv.reader(io.StringIO(text, newline=""))))
    if kind == "json":
        decoder, at, found = json.JSONDecoder(), 0, 0
        while at < len(text):
            _obj, at = decoder.raw_decode(text, at)
            assert text[at] == "\n", "one object per line"
            at, found = at + 1, found + 1
        return found
    return text.count("\n")


def _write(spec, kind, samples):
    """The text `kind` makes of the rows decode() makes; and how many rows."""
    stream = io.StringIO(newline="")
    w = output.writer(kind, stream, spec.columns, show_time=True, show_timestamp=True, wide=True,
                      extended=True)
    w.header()
    written = 0
    for values in samples:
        row = spec.decode(values, _ctx(spec))
        if row is not None:
            w.row(values[0], row)
            written += 1
    return stream.getvalue(), written


@pytest.mark.parametrize("kind", output.FORMATS)
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_decoded_rows_format_in_every_output(spec, kind):
    """Random samples: each row decode() makes is written as exactly one
    record (and the table and CSV header as one more), whatever bytes the
    task names hold."""
    rng = random.Random(7)
    samples = [spec.event.struct.unpack(bytes(rng.randrange(256) for _ in range(spec.event.size)))
               for _ in range(50)]
    text, written = _write(spec, kind, samples)
    assert written > 0, "no random sample decoded: nothing was checked"
    assert _records(kind, text) == written + (kind != "json")


# A task name may hold any byte but NUL (prctl PR_SET_NAME): a "\n" in
# COMM would break a table row, a "\r" a CSV one (its line terminator is
# "\n" alone); net.COMM escapes them.
@pytest.mark.parametrize("spec,kind", [
    pytest.param(spec, kind, id=f"{spec.name}-{kind}")
    for spec in SPECS if "comm" in spec.event.names
    for kind in ("table", "csv")
    if kind == "csv" or any(c.key == "comm" and c.table for c in spec.columns)
])
def test_line_break_in_comm_stays_in_its_row(spec, kind):
    fields = dict(ts_ns=10**9, family=2, pid=1234, comm=b"a\nb" if kind == "table" else b"a\rb")
    # A tool shows COMM only for an owner it knows: claim every one is.
    fields.update({name: 0xFF for name in spec.event.names if name.endswith(("_known", "flags"))})
    text, written = _write(spec, kind, [make_event(spec, **fields)])
    assert written == 1
    assert _records(kind, text) == 2, text


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_bpf_source_names_its_tracepoints(spec):
    """Each .bpf.c opens with a comment naming what it traces."""
    source = codegen.bpf_source(spec.bpf)
    head = source.split("*/", 1)[0]
    assert head.lstrip().startswith("/*")
    for tp in spec.tracepoints:
        assert tp.name in source or tp.event in source
    assert not re.search(r"\bk(ret)?probe__|attach_k(ret)?probe|SEC\(\"(k|f)", source)
