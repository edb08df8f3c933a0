"""The table's batch path (decode, pick, printf-format, one write) writes
exactly what row-by-row writing does, for every tool and option, blanks
and odd values included."""

import functools
import io
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from events import make_event
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
    good = (None, "ffff", 1, "c", 4, "10.0.0.1", 1, "10.0.0.2", 2, "ESTABLISHED", "->", "CLOSE_WAIT", None,
            44, None, None, None, 4026531840)

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


# -- the table path derived from the column declarations -------------------------

# Tools whose table has no derived path, and the reason derive_table gives.
# A tool that is not listed must have one in every layout.
NO_DERIVED_PATH = {
    "resets": "column pid declares no value",
    "retrans": "column pid declares no value",
    "top": "column pid declares no value",  # interval tables only (tcptrace/tools/top.py)
}
LAYOUTS = [{}, {"wide": True}, {"extended": True}, {"wide": True, "extended": True}, {"show_time": True},
           {"show_timestamp": True}]
LAYOUT_IDS = ["default", "wide", "x", "wide,x", "T", "t"]
DERIVED = [s for s in SPECS if s.name not in NO_DERIVED_PATH]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("options", LAYOUTS, ids=LAYOUT_IDS)
def test_a_run_takes_the_derived_table_path(spec, options):
    """What a run asks for (batch_for) is the derived path, so a column
    declared without a value cannot make a table silently slower."""
    w = output.writer("table", io.StringIO(), spec.columns, **options)
    path = output.batch_for(spec, w)
    if spec.name in NO_DERIVED_PATH:
        with pytest.raises(output.NoFastPath, match=NO_DERIVED_PATH[spec.name]):
            output.derive_table(spec, w)
        assert path == w.batch
    else:
        assert isinstance(path, output.DerivedTable) and path.writer is w


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("kind", ["csv", "json"])
def test_csv_and_json_take_their_writers_batch(spec, kind):
    w = output.writer(kind, io.StringIO(), spec.columns, tool=spec.name)
    assert output.batch_for(spec, w) == w.batch


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
    return st.one_of(st.just(0), st.just(1), st.just(2**bits - 1), st.integers(0, 2**bits - 1))


def events_of(spec):
    fields = [field_values(name, ftype) for name, ftype in spec.event.fields]
    packed = st.tuples(*fields).map(lambda v: spec.event.struct.unpack(spec.event.struct.pack(*v)))
    return st.lists(packed, max_size=20)


CONTEXTS = [DecodeContext(), DecodeContext(btf={"tcp_sock.bytes_acked": (1, 4)})]  # counters of the wrong size


def both_paths(spec, options, events, ctx, decode=None):
    """(text, counts, rows) of the derived path, then of decode() and the writer."""
    written = []
    for derived in (True, False):
        stream = io.StringIO()
        w = output.writer("table", stream, spec.columns, **options)
        path = output.derive_table(spec, w) if derived else w.batch
        counts = path(events, decode or spec.decode, ctx)
        written.append((stream.getvalue(), counts, w.rows))
    if options.get("show_time"):  # the wall clock may tick between the two
        written = [([line[9:] for line in text.splitlines()], counts, rows) for text, counts, rows in written]
    return written


@pytest.mark.parametrize("spec", DERIVED, ids=[s.name for s in DERIVED])
@pytest.mark.parametrize("options", LAYOUTS, ids=LAYOUT_IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_derived_table_path_writes_what_decode_and_the_writer_write(spec, options, data):
    """Event for event, blanks and odd values included."""
    events = data.draw(events_of(spec))
    ctx = data.draw(st.sampled_from(CONTEXTS))
    derived, writer = both_paths(spec, options, events, ctx)
    assert derived == writer


# Fields of an event with nothing blank: it must take the derived loop's
# fast branch (a value declared wrong would send every event the careful way).
ADDR = bytes([10, 0, 0, 1]) + bytes(12)
COMPLETE = {
    "states": {"delta_ns": 5_000_000},
    "life": {"pid": 181, "bytes_known": 1, "retrans_known": 1, "connect_known": 1, "closer": 2,
             "tx_bytes": 100_002, "rx_bytes": 5_001},
    "connect": {"pid": 181, "lat_ns": 250_000},
    "accept": {"pid": 181, "owner_known": 1},
    # An IPv4 header without options, then TCP 45678 -> 80 with SYN set.
    "drops": {"pid": 181, "values_known": 3, "state": 1, "reason": 3,
              "hdr": bytes([0x45]) + bytes(11) + ADDR[:4] + bytes([127, 0, 0, 2])
              + (45678).to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes(9) + b"\x02" + bytes(46)},
    "probe": {"pid": 181, "owner_known": 1, "ssthresh": 20, "ca_state": 0, "cwnd": 30, "srtt_us": 57},
}


def test_every_derived_tool_has_a_complete_event():
    assert sorted(COMPLETE) == sorted(s.name for s in DERIVED)


@pytest.mark.parametrize("spec", DERIVED, ids=[s.name for s in DERIVED])
@pytest.mark.parametrize("options", LAYOUTS, ids=LAYOUT_IDS)
def test_an_event_without_blanks_takes_the_fast_branch(spec, options):
    common = dict(ts_ns=1, family=2, lport=8080, rport=80, saddr=ADDR, daddr=ADDR, comm=b"curl")
    ev = make_event(spec, **{k: v for k, v in common.items() if k in spec.event.names}, **COMPLETE[spec.name])
    w = output.writer("table", io.StringIO(), spec.columns, **options)
    path = output.batch_for(spec, w)
    assert path([ev, ev], spec.decode, DecodeContext()) == (2, 0)
    assert path.careful == 0 and "10.0.0.1" in w.stream.getvalue()


def test_blanks_and_failures_take_the_careful_path():
    """A value that is blank goes to decode(): a row it skips is not
    written, one it cannot make sense of is counted, the others are
    written as the writer writes them."""
    spec = TOOLS["states"]
    pid = next(c for c in spec.columns if c.key == "pid")
    columns = tuple(replace(pid, value="None if pid in (13, 14) else pid") if c is pid else c for c in spec.columns)

    @functools.wraps(spec.decode)
    def decode(values, ctx):
        if values[3] == 13:
            raise ValueError("garbage")
        return None if values[3] == 14 else spec.decode(values, ctx)

    odd = replace(spec, columns=columns, decode=decode)
    events = [make_event(spec, ts_ns=i, pid=pid, family=2, delta_ns=1000) for i, pid in enumerate((12, 13, 14, 15))]
    derived, writer = both_paths(odd, {}, events, DecodeContext(), decode)
    assert derived == writer and derived[1] == (2, 1)


def test_a_per_batch_value_that_fails_hands_the_batch_to_decode():
    spec = TOOLS["life"]
    events = [make_event(spec, ts_ns=1, pid=181, bytes_known=1, family=2)]
    derived, writer = both_paths(spec, {}, events, None)  # _counters_trusted(None) raises
    assert derived == writer and derived[1] == (0, 1)


@pytest.mark.parametrize("value, reason", [
    ("", "column pid declares no value"),
    ("pid +", "column pid's value is not a Python expression"),
    ("no_such_name[pid]", "column pid's value names no_such_name, neither an event field nor a known name"),
])
def test_a_layout_without_a_derived_path_says_why(value, reason):
    spec = TOOLS["connect"]
    columns = tuple(replace(c, value=value) if c.key == "pid" else c for c in spec.columns)
    w = output.writer("table", io.StringIO(), columns)
    with pytest.raises(output.NoFastPath, match=re.escape(reason)):
        output.derive_table(replace(spec, columns=columns), w)
    assert output.batch_for(replace(spec, columns=columns), w) == w.batch


def test_the_derived_path_is_generated_from_declarations_only():
    """The generated loop holds column expressions, field names and its own
    names: a shared lookup is made once per event, a function of ctx once
    per batch."""
    spec = TOOLS["life"]
    source = output.derive_table(spec, output.writer("table", io.StringIO(), spec.columns)).source
    assert source.count("_counters_trusted(ctx)") == 1 and source.count("ADDRESS[family]") == 1
