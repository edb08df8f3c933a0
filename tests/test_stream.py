"""Samples to rows: short and garbage samples are counted, never decoded."""

import io
import socket

from hypothesis import given, settings, strategies as st

from events import make_event
from tcptrace.spec import DecodeContext
from tcptrace.stream import EventStream
from tcptrace.tools import TOOLS, states


def pack(**fields):
    return states.EVENT.struct.pack(*make_event(states.SPEC, **fields))


def sample(ts, old=2, new=1):
    addr = socket.inet_pton(socket.AF_INET, "127.0.0.1") + bytes(12)
    return pack(ts_ns=ts, skaddr=1, pid=42, oldstate=old, newstate=new, family=2, lport=1000, rport=2000,
                saddr=addr, daddr=addr, comm=b"x")


def collect(**kw):
    rows = []
    stream = EventStream(states.SPEC, DecodeContext(), lambda ts, row: rows.append((ts, row)), **kw)
    return stream, rows


def test_short_samples_are_counted_not_decoded():
    stream, rows = collect()
    stream.add(sample(1)[:-1])
    stream.add(b"")
    stream.add(sample(2) + b"trailing")
    stream.drain()
    assert stream.short == 2 and [ts for ts, _ in rows] == [2]


def test_perf_batches_are_ordered_by_kernel_time():
    stream, rows = collect(ordered=False)
    for ts in (30, 10, 20):
        stream.add(sample(ts))
    stream.drain()
    assert [ts for ts, _ in rows] == [10, 20, 30]


def test_max_events_stops_mid_batch():
    stream, rows = collect(max_events=2)
    for ts in range(5):
        stream.add(sample(ts))
    assert stream.drain() is True and len(rows) == 2 and stream.done


def test_a_decoder_failure_is_counted():
    def broken(values, ctx):
        raise ValueError("bad")

    from dataclasses import replace

    stream = EventStream(replace(states.SPEC, decode=broken), DecodeContext(), lambda *a: None)
    stream.add(sample(1))
    stream.drain()
    assert stream.malformed == 1


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(TOOLS)), st.lists(st.binary(max_size=300), max_size=20))
def test_any_bytes_never_raise(tool, samples):
    spec = TOOLS[tool]
    seen = []
    stream = EventStream(spec, DecodeContext(wide=True, extended=True), lambda ts, row: seen.append(row))
    for raw in samples:
        stream.add(raw)
    stream.drain()
    assert stream.short == sum(1 for s in samples if len(s) < spec.event.size)
    assert len(seen) + stream.malformed <= len(samples) - stream.short


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 13), st.integers(0, 13), st.sampled_from([0, 2, 10]),
                          st.sampled_from([0, 5_000_000, (1 << 64) - 1])), max_size=30))
def test_a_table_batch_writes_what_its_rows_write(changes):
    """The path a run takes for a ring buffer's batch (batch_for: for
    states' table, the one derived from its columns) writes, and counts,
    what row-by-row writing of the same samples does."""
    from tcptrace import output

    addr = socket.inet_pton(socket.AF_INET, "10.0.0.1") + bytes(12)
    raws = [pack(ts_ns=ts, skaddr=1, delta_ns=delta, pid=42, oldstate=old, newstate=new, family=family,
                 lport=1000, rport=2000, saddr=addr, daddr=addr, comm=b"x")
            for ts, (old, new, family, delta) in enumerate(changes)]
    texts = []
    for batch in (True, False):
        out = io.StringIO()
        writer = output.writer("table", out, states.SPEC.columns)
        stream = EventStream(states.SPEC, DecodeContext(), writer.row, ordered=batch,
                             write_batch=output.batch_for(states.SPEC, writer))
        if batch:
            assert isinstance(stream.write_batch, output.DerivedTable)
            stream.add_values([states.EVENT.struct.unpack(raw) for raw in raws])
        else:
            for raw in raws:
                stream.add(raw)
        stream.drain()
        texts.append((out.getvalue(), stream.rows, stream.malformed))
    assert texts[0] == texts[1] and texts[0][1] == len(changes)
