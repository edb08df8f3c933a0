"""From kernel samples to written rows, without bcc: size checks, decoding,
ordering and the --max-events limit. Samples are only collected while the
buffer is polled (a ctypes callback must stay trivial: an exception raised
there would be swallowed) and turned into rows after the poll returns."""


class EventStream:
    def __init__(self, spec, ctx, write, max_events=0, ordered=True):
        self.size = spec.event.size
        self.unpack = spec.event.struct.unpack
        self.decode = spec.decode
        self.ctx = ctx
        self.write = write
        self.max_events = max_events
        self.ordered = ordered  # False for per-CPU perf buffers: sort each batch
        self.pending = []
        self.pending_values = []
        self.rows = 0
        self.short = 0  # samples shorter than the event: counted, never decoded
        self.malformed = 0  # samples decode() could not make sense of

    def add_values(self, values):
        """A sample the reader already unpacked (where it lay in the buffer)."""
        self.pending_values.append(values)

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
            # each row written as it is decoded, no list of rows first.
            batch, self.pending_values = self.pending_values, []
            write = self.write
            written = 0
            for values in batch:
                try:
                    row = decode(values, ctx)
                except Exception:
                    self.malformed += 1
                    continue
                if row is not None:
                    write(values[0], row)
                    written += 1
            self.rows += written
            return False
        batch, self.pending = self.pending, []
        samples, self.pending_values = self.pending_values, []
        unpack = self.unpack
        for raw in batch:
            try:
                samples.append(unpack(raw))
            except Exception:
                self.malformed += 1
        rows = []
        for values in samples:
            try:
                row = decode(values, ctx)
            except Exception:
                self.malformed += 1
                continue
            if row is not None:
                rows.append((values[0], row))
        if not self.ordered:
            rows.sort(key=lambda r: r[0])
        write, limit = self.write, self.max_events
        for ts, row in rows:
            write(ts, row)
            self.rows += 1
            if limit and self.rows >= limit:
                return True
        return False
