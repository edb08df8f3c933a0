"""The JSON Lines schema: the shipped file is what the generator writes, the
schema is valid, and what every tool's decoder and the JSON writer produce
(events under any options, count rows) validates against it; the envelope's
timestamps are exact."""

import datetime
import io
import json
import random
import re
import socket

import jsonschema
import pytest
from hypothesis import given, settings, strategies as st

from tcptrace import events, output
from tcptrace.spec import Column, DecodeContext
from tcptrace.tools import TOOLS

SPECS = sorted(TOOLS.values(), key=lambda s: s.name)
COUNTERS = [s for s in SPECS if s.counter]


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(events.shipped())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def lines(text):
    # JSON Lines are split on "\n" only: a task name may hold U+2028, which
    # str.splitlines() would split on too.
    return [json.loads(line) for line in text.split("\n") if line]


def test_shipped_schema_is_what_the_generator_writes():
    """If this fails: python -m tcptrace.events > tcptrace/schema/events-v1.json"""
    assert events.shipped() == events.render()


def test_schema_names_every_tool_and_count_mode():
    schema = events.events_schema()
    assert set(schema["$defs"]) == {s.name for s in SPECS} | {f"{s.name}.count" for s in COUNTERS} | \
        {f"{s.name}.hist" for s in COUNTERS if s.counter.histogram}
    assert schema["$id"].endswith(f"v{output.SCHEMA_VERSION}") and schema["required"] == list(output.ENVELOPE)
    assert events.SCHEMA_FILE == f"events-v{output.SCHEMA_VERSION}.json"


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_schema_keys_are_the_json_columns(spec):
    rec = events.events_schema()["$defs"][spec.name]
    keys = [c.key for c in spec.columns if c.json]
    assert list(rec["properties"]) == list(output.ENVELOPE) + ["time", "timestamp"] + keys
    assert rec["required"] == list(output.ENVELOPE) + [c.key for c in spec.columns if c.json and not c.extended]
    assert rec["additionalProperties"] is False


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_event_validates(validator, spec, data):
    """Any sample the kernel could send decodes to an object the schema
    accepts, under any options: the columns' declared types are right."""
    extended, show_time, show_timestamp = (data.draw(st.booleans()) for _ in range(3))
    raw = data.draw(st.binary(min_size=spec.event.size, max_size=spec.event.size))
    values = spec.event.struct.unpack(raw)
    row = spec.decode(values, DecodeContext(extended=extended, wide=True))
    if row is None:
        return
    stream = io.StringIO()
    w = output.writer("json", stream, spec.columns, tool=spec.name, extended=extended, show_time=show_time,
                      show_timestamp=show_timestamp)
    w.row(values[0], row)
    [obj] = lines(stream.getvalue())
    errors = [e.message for e in validator.iter_errors(obj)]
    assert not errors, (obj, errors)


@pytest.mark.parametrize("spec", COUNTERS, ids=[s.name for s in COUNTERS])
def test_count_rows_validate(validator, spec):
    rng = random.Random(3)
    stream = io.StringIO()
    w = output.writer("json", stream, spec.columns, tool=spec.name)
    counter = spec.counter
    rows = []
    for _ in range(200):
        key = counter.key.struct.unpack(bytes(rng.randrange(256) for _ in range(counter.key.size)))
        if counter.value is None:
            rows.append(tuple(counter.decode(key, DecodeContext())) + (7,))
            continue
        # What the session does with a value struct (runtime/session.py read_counts).
        value = counter.value.struct.unpack(bytes(rng.randrange(256) for _ in range(counter.value.size)))
        row = tuple(counter.decode(key, value, DecodeContext()))
        rows.append(row + (value[counter.value.names.index(counter.count)],) if counter.count else row)
    count = [Column("count", counter.count_header, 8, "d", right=True)] if counter.value is None or \
        counter.count else []
    columns = list(counter.columns) + count
    if counter.finish:
        columns, rows = counter.finish({}, columns, rows, (1.7e9, 1.0), DecodeContext())
    w.summary(columns, rows)
    objs = lines(stream.getvalue())
    assert len(objs) == 200
    for obj in objs:
        assert not list(validator.iter_errors(obj)), obj


def test_an_event_of_one_tool_does_not_pass_as_another(validator):
    stream = io.StringIO()
    spec = TOOLS["accept"]
    output.writer("json", stream, spec.columns, tool="states").row(1, (None, 1, "nginx", 4, "10.0.0.1", 80,
                                                                       "10.0.0.2", 5000, 0.1, 44, "/a", None, None, 1))
    assert list(validator.iter_errors(lines(stream.getvalue())[0]))


def test_envelope_comes_first():
    stream = io.StringIO()
    spec = TOOLS["accept"]
    w = output.writer("json", stream, spec.columns, tool="accept", show_time=True)
    w.row(1_234_567_890_123, (None, 1, "nginx", 4, "10.0.0.1", 80, "10.0.0.2", 5000, 0.1, 44, "/a", None, None, 1))
    text = stream.getvalue()
    assert text.startswith('{"ts":"') and text.endswith("}\n") and text.count("\n") == 1
    obj = json.loads(text)
    assert list(obj)[:6] == ["ts", "ts_mono", "host", "tool", "schema", "time"]
    assert obj["host"] == socket.gethostname() and obj["tool"] == "accept" and obj["schema"] == 1
    assert '"ts_mono":1234.567890123,' in text  # the kernel's nanoseconds, every digit


def wall(ts_ns, offset_ns):
    ns = ts_ns + offset_ns
    at = datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc)
    return at.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns % 10**9) // 1000:06d}Z"


@settings(max_examples=500, deadline=None)
@given(ts=st.integers(min_value=0, max_value=10**16))
def test_stamps_are_exact(ts):
    stamps = output.Stamps("X")
    head = stamps.head(ts)
    assert head == f'{{"ts":"{wall(ts, stamps.offset_ns)}","ts_mono":{ts // 10**9}.{ts % 10**9:09d},X,'


def test_stamps_follow_the_clock():
    """ts is the wall clock of the moment the kernel stamped: for a stamp
    taken now, within a second of time.time(), in UTC."""
    import time

    stamps = output.Stamps("")
    now = time.monotonic_ns()
    head = stamps.head(now)
    ts = re.match(r'\{"ts":"([^"]+)"', head).group(1)
    parsed = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert abs(parsed.timestamp() - time.time()) < 1.0
    # A second boundary crossed by the offset's sub-second part carries over.
    later = stamps.head(now + 10**9)
    assert later > head
