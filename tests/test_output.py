"""The table's batch path (decode, pick, printf-format, one write) writes
exactly what row-by-row writing does, for every tool and option, blanks
and odd values included."""

import io

import pytest
from hypothesis import given, settings, strategies as st

from tcptrace import layout, output
from tcptrace.spec import DecodeContext
from tcptrace.tools import TOOLS

SPECS = sorted(TOOLS.values(), key=lambda s: s.name)
OPTIONS = [{}, {"wide": True}, {"extended": True}, {"wide": True, "extended": True},
           {"show_time": True}, {"show_timestamp": True}]

ODD_JSON = st.one_of(st.none(), st.text(max_size=20), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=True, allow_infinity=True))
ODD = st.one_of(ODD_JSON, st.binary(max_size=4))  # a table prints anything; JSON has no bytes


def value(col, odd=ODD):
    """What decode() gives for a column, and, now and then, what it should not."""
    spec = col.spec or "s"
    if spec.endswith(("d", "x")):
        usual = st.integers(0, 2**64)
    elif spec.endswith("f"):
        usual = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
    else:
        usual = st.text(max_size=40)
    if col.nullable:
        usual = st.one_of(usual, st.none())
    return st.one_of(usual, usual, usual, odd)


def rows_for(spec, odd=ODD):
    return st.lists(st.tuples(*(value(c, odd) for c in spec.columns)), max_size=12)


def by_rows(spec, kind, options, samples, decode):
    stream = io.StringIO()
    w = output.writer(kind, stream, spec.columns, tool=spec.name, **options)
    for values in samples:
        try:
            row = decode(values, None)
        except Exception:
            continue
        if row is not None:
            w.row(values[0], row)
    return stream.getvalue(), w.rows


def by_batch(spec, kind, options, samples, decode):
    stream = io.StringIO()
    w = output.writer(kind, stream, spec.columns, tool=spec.name, **options)
    written, malformed = w.batch(samples, decode, None)
    assert written == w.rows
    return stream.getvalue(), written, malformed


def plain(values, _ctx):
    return values[1]


def same_text(a, b, options):
    if options.get("show_time"):  # a wall-clock second may tick between the two runs
        cut = lambda text: [line[9:] for line in text.splitlines()]
        return cut(a) == cut(b)
    return a == b


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_table_batch_writes_what_rows_write(spec, options, data):
    rows = data.draw(rows_for(spec))
    samples = [(1_000_000_000 + i, row) for i, row in enumerate(rows)]
    expected, count = by_rows(spec, "table", options, samples, plain)
    text, written, malformed = by_batch(spec, "table", options, samples, plain)
    assert same_text(text, expected, options) and written == count == len(rows) and malformed == 0


def from_ts_mono(text):
    """JSON lines without `ts`: each writer takes its own wall-clock offset."""
    return [line[line.index('"ts_mono"'):] for line in text.split("\n") if line]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("kind", ["csv", "json"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_csv_and_json_batches_write_what_rows_write(spec, kind, data):
    rows = data.draw(rows_for(spec, ODD_JSON))
    samples = [(1_000_000_000 + i, row) for i, row in enumerate(rows)]
    options = {"extended": True}
    expected, count = by_rows(spec, kind, options, samples, plain)
    text, written, malformed = by_batch(spec, kind, options, samples, plain)
    if kind == "json":
        text, expected = from_ts_mono(text), from_ts_mono(expected)
    assert text == expected and written == count == len(rows) and malformed == 0


@pytest.mark.parametrize("kind", ["table", "csv", "json"])
def test_batch_counts_samples_that_do_not_decode_and_skips_none(kind):
    spec = TOOLS["states"]
    good = ("ffff", 1, "c", 4, "10.0.0.1", 1, "10.0.0.2", 2, "ESTABLISHED", "->", "CLOSE_WAIT", None)

    def decode(values, _ctx):
        if values[1] == "bad":
            raise ValueError("garbage")
        return None if values[1] == "skip" else good

    samples = [(1, "ok"), (2, "bad"), (3, "skip"), (4, "ok"), (5, "bad")]
    text, written, malformed = by_batch(spec, kind, {}, samples, decode)
    assert (written, malformed) == (2, 2)
    expected, _ = by_rows(spec, kind, {}, samples, decode)
    if kind == "json":
        assert len(from_ts_mono(text)) == 2 and from_ts_mono(text) == from_ts_mono(expected)
    else:
        assert text == expected


def test_blank_text_prints_a_dash_not_none():
    spec = TOOLS["life"]
    shown = [c for c in spec.columns if c.table and not c.extended and not c.wide_only]
    assert any(c.nullable and not c.spec for c in shown), "life has a nullable text column (COMM)"
    row = tuple(None if c.nullable else (0 if c.spec.endswith(("d", "x", "f")) else "x") for c in spec.columns)
    text, written, _ = by_batch(spec, "table", {}, [(1, row)], plain)
    assert written == 1 and "None" not in text and " - " in text


# -- a tool's own table path (ToolSpec.table_batch) ------------------------------

OWN = [s for s in SPECS if s.table_batch]
SCALAR = {"u8": 8, "u16": 16, "u32": 32, "u64": 64}


def field_values(name, ftype):
    base, count = layout._split(ftype)
    if count:
        return st.binary(min_size=count, max_size=count)
    if name == "family":
        return st.sampled_from([2, 10, 0, 1])
    if base == "s32":
        return st.integers(-3, 15)
    bits = SCALAR[base]
    return st.one_of(st.just(0), st.just(2**bits - 1), st.integers(0, 2**bits - 1))


def events_of(spec):
    fields = [field_values(name, ftype) for name, ftype in spec.event.fields]
    packed = st.tuples(*fields).map(lambda v: spec.event.struct.unpack(spec.event.struct.pack(*v)))
    return st.lists(packed, max_size=20)


CONTEXTS = [DecodeContext(), DecodeContext(btf={"tcp_sock.bytes_acked": (1, 4)})]  # counters of the wrong size


@pytest.mark.parametrize("spec", OWN, ids=[s.name for s in OWN])
@pytest.mark.parametrize("options", [{}, {"wide": True}, {"extended": True}, {"show_time": True}],
                         ids=["default", "wide", "x", "T"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_own_table_path_writes_what_decode_and_the_writer_write(spec, options, data):
    """Event for event, a tool's own table path writes what decode() and
    the writer's batch write; where it was not made for the layout it hands
    over to the writer."""
    events = data.draw(events_of(spec))
    ctx = data.draw(st.sampled_from(CONTEXTS))
    written = []
    for own in (True, False):
        stream = io.StringIO()
        w = output.writer("table", stream, spec.columns, **options)
        counts = spec.table_batch(w, events, spec.decode, ctx) if own else w.batch(events, spec.decode, ctx)
        written.append((stream.getvalue(), counts, w.rows))
    if options.get("show_time"):  # the wall clock may tick between the two
        written = [([line[9:] for line in text.splitlines()], counts, rows) for text, counts, rows in written]
    assert written[0] == written[1]


@pytest.mark.parametrize("spec", OWN, ids=[s.name for s in OWN])
def test_own_table_path_is_the_one_a_run_takes(spec):
    from tcptrace.runtime import RunOptions, Session

    table = Session(spec, RunOptions(), output.writer("table", io.StringIO(), spec.columns))
    assert table._write_batch().func is spec.table_batch
    json_session = Session(spec, RunOptions(), output.writer("json", io.StringIO(), spec.columns))
    assert json_session._write_batch() == json_session.writer.batch
