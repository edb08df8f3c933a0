"""From kernel samples to written rows, without bcc: size checks, decoding,
ordering and the --max-events limit. Samples are only collected while the
buffer is polled (a ctypes callback must stay trivial: an exception raised
there would be swallowed) and turned into rows after the poll returns."""


class Decoded:
    """The rows of a batch of samples, as (timestamp, row) pairs; samples
    decode() gives None for are left out, and those it could not make
    sense of are counted in .malformed."""

    def __init__(self, samples, decode, ctx):
        self.samples, self.decode, self.ctx = samples, decode, ctx
        self.malformed = 0

    def __iter__(self):
        decode, ctx = self.decode, self.ctx
        for values in self.samples:
            try:
                row = decode(values, ctx)
            except Exception:
                self.malformed += 1
                continue
            if row is not None:
                yield values[0], row


def each_row(samples, decode, ctx, write):
    """Decode samples and write(ts, row) each row; returns (rows written,
    samples decode() could not make sense of)."""
    rows = Decoded(samples, decode, ctx)
    written = 0
    for ts, row in rows:
        write(ts, row)
        written += 1
    return written, rows.malformed


class EventStream:
    def __init__(self, spec, ctx, write, max_events=0, ordered=True, write_batch=None):
        self.size = spec.event.size
        self.unpack = spec.event.struct.unpack
        self.decode = spec.decode
        self.ctx = ctx
        self.write = write
        # write_batch(samples, decode, ctx) -> (rows written, samples that
        # did not decode): a writer's own loop over a whole batch.
        self.write_batch = write_batch or (lambda samples, decode, ctx: each_row(samples, decode, ctx, write))
        self.max_events = max_events
        self.ordered = ordered  # False for per-CPU perf buffers: sort each batch
        self.pending = []
        self.pending_values = []
        self.rows = 0
        self.handed = 0  # rows plus the samples of the batch being written, if a write is cut short
        self.short = 0  # samples shorter than the event: counted, never decoded
        self.malformed = 0  # samples decode() could not make sense of

    def add_values(self, samples):
        """Samples the reader already unpacked (where they lay in the buffer)."""
        if self.pending_values:
            self.pending_values += samples
        else:
            self.pending_values = samples

    def add(self, raw):
        if len(raw) < self.size:
            self.short += 1
        else:
            self.pending.append(raw[: self.size] if len(raw) > self.size else raw)

    @property
    def done(self):
        return bool(self.max_events) and self.rows >= self.max_events

    def drain(self):
        """Write what was collected; True once --max-events is reached."""
        if not self.pending and not self.pending_values:
            return self.done
        decode, ctx = self.decode, self.ctx
        if not self.pending and self.ordered and not self.max_events:
            # The common case (a ring buffer read in place, no --max-events):
            # the writer takes the batch, each row written as it is decoded.
            batch, self.pending_values = self.pending_values, []
            self.handed = self.rows + len(batch)
            written, malformed = self.write_batch(batch, decode, ctx)
            self.rows += written
            self.handed = self.rows
            self.malformed += malformed
            return False
        batch, self.pending = self.pending, []
        samples, self.pending_values = self.pending_values, []
        unpack = self.unpack
        for raw in batch:
            try:
                samples.append(unpack(raw))
            except Exception:
                self.malformed += 1
        decoded = Decoded(samples, decode, ctx)
        rows = list(decoded)
        self.malformed += decoded.malformed
        if not self.ordered:
            rows.sort(key=lambda r: r[0])
        write, limit = self.write, self.max_events
        self.handed = self.rows + len(rows)
        for ts, row in rows:
            write(ts, row)
            self.rows += 1
            if limit and self.rows >= limit:
                break
        self.handed = self.rows
        return bool(limit) and self.rows >= limit
