"""Samples to rows: short and garbage samples are counted, never decoded."""

import socket

from hypothesis import given, settings, strategies as st

from tcptrace.spec import DecodeContext
from tcptrace.stream import EventStream
from tcptrace.tools import TOOLS, states


def sample(ts, old=2, new=1):
    addr = socket.inet_pton(socket.AF_INET, "127.0.0.1") + bytes(12)
    return states.EVENT.struct.pack(ts, 1, 0, 42, old, new, 2, 1000, 2000, addr, addr, b"x")


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
