"""A session: open (preflight, plan, program, maps, attach, buffer), loop,
close. Everything else is behind the modules it calls: plan (pure), build
(the chain to a Program), program/bcc (the two Program implementations),
ringbuf (reading the ring in place), losses (what was not printed) and
stopper (signals)."""

import re
import struct
import sys
import time

from .. import tracefs
from ..errors import BuildError
from ..output import batch_for, silence_stdout
from ..spec import Column, DecodeContext
from . import build
from .bpfsys import BPF_NOEXIST
from .losses import Losses
from .plan import plan as make_plan
from .preflight import check_memlock, check_privileges, formats_source
from .ringbuf import BATCH
from .stopper import Stopper, StopWriting

POLL_MS = 100
LAST_DRAIN_S = 2.0  # how long the end of a run may spend printing what is still buffered
STATS_EVERY_S = 1.0


def activity(spec):
    """What the ready line says a tool traces: its summary's object
    ("Trace TCP state changes, with ..." -> "TCP state changes")."""
    words = re.sub(r"^(Trace|Count|Serve)\s+", "", spec.summary)
    return re.split(r"[,:.;]", words, maxsplit=1)[0].strip()


class Session:
    """One loaded program: open, run, close.

    With buffer=False the program only counts into maps, which the caller
    reads (read_percpu, read_table): no event buffer is opened."""

    def __init__(self, spec, opts, writer, err=sys.stderr, buffer=True):
        self.spec = spec
        self.opts = opts
        self.writer = writer
        self.err = err
        self.program = None
        self.poll = None
        self.stream = None
        self.losses = Losses()
        self.flushed_rows = 0  # rows written and flushed
        self.counting = bool(opts.count and spec.counter)
        self.buffered = buffer and not self.counting
        self.attached = []  # the tracepoints attached, in the spec's order

    def say(self, text):
        self.err.write(f"tcptrace: {text}\n")
        self.err.flush()

    def verbose(self, text):
        if self.opts.verbose:
            self.say(text)

    @property
    def functions(self):
        return [tp.function for tp in self.spec.tracepoints if tp.name in self.attached]

    # -- set-up ---------------------------------------------------------------

    def open(self):
        t0 = time.monotonic()
        check_privileges()
        source = formats_source()
        check_memlock()
        self.plan = make_plan(self.spec, self.opts, source)
        for tp, why in self.plan.missing:
            self.verbose(f"{tp.name} unavailable on this kernel ({why}): its columns stay blank")
        self.ctx = DecodeContext(wide=self.opts.wide, extended=self.opts.extended, symbols=self.plan.symbols,
                                 btf=self.plan.btf)
        from ..procfs import OwnerResolver

        self.ctx.owners = OwnerResolver()
        functions = [tp.function for tp in self.spec.tracepoints if tp.name in self.plan.formats]
        self.program = build.load(self.plan, f"`tcptrace {self.spec.name}`", functions, self.verbose, self.err)
        t1 = time.monotonic()
        self._fill_maps()
        self._attach()
        self._seed_listeners()
        if self.buffered:
            self._open_buffer()
        self.verbose(
            f"{self.program.origin}; {'ring' if self.plan.use_ring else 'perf'} buffer; "
            f"ready in {time.monotonic() - t0:.3f} s (build {t1 - t0:.3f} s)"
        )

    def announce(self, what=None):
        """The line that says tracing has begun (-q silences it): people
        and scripts wait for it instead of guessing."""
        if self.opts.quiet:
            return
        doing = "counting" if self.counting else "tracing"
        for_how_long = f" for {self.opts.duration:g} s" if self.opts.duration else ""
        self.err.write(f"tcptrace {self.spec.name}: {what or doing + ' ' + activity(self.spec)}{for_how_long}; "
                       "Ctrl-C to end\n")
        self.err.flush()

    def map(self, name):
        """A map of the program, read and written as bytes, on either path."""
        return self.program.map(name)

    def _fill_maps(self):
        for name, entries in self.plan.maps.items():
            m = self.map(name)
            for key, value in entries:
                if isinstance(key, int):
                    key = key.to_bytes(m.key_size, sys.byteorder)
                if isinstance(value, int):
                    value = value.to_bytes(m.value_size, sys.byteorder)
                m.update(key, value)

    def _seed_listeners(self):
        """Owners of listeners opened before tracing, from /proc, for programs
        with owner tracking: the connections they accept then inherit one."""
        try:
            table = self.map("listen_owners")
        except KeyError:
            return
        from ..procfs import listener_owners

        for port, (pid, comm) in listener_owners().items():
            owner = struct.pack("<II16s", pid, 1, comm.encode()[:15])  # struct owner in tcptrace.h
            try:
                table.update(port.to_bytes(2, sys.byteorder), owner, BPF_NOEXIST)
            except FileExistsError:  # learned since attaching: the kernel knows better
                continue
            except OSError:  # the map is full: those owners stay unknown
                break

    def _attach(self):
        root = tracefs.find_mount()  # the live tracefs: the formats may come from elsewhere, the IDs may not
        for tp in self.spec.tracepoints:
            if tp.name not in self.plan.formats:
                continue
            try:
                self.program.attach(root, tp.name, tp.function)
                self.attached.append(tp.name)
            except Exception as e:
                self.close()
                raise BuildError(
                    f"attaching to {tp.name} failed ({first_line(e)}): the kernel's verifier may have "
                    "rejected the program (its log is above)."
                )

    def _open_buffer(self):
        from ..stream import EventStream

        self.stream = EventStream(
            self.spec, self.ctx, self.writer.row, self.opts.max_events, ordered=self.plan.use_ring,
            write_batch=batch_for(self.spec, self.writer),
        )
        self.poll = self.program.open_events(
            self.stream.add, self.stream.add_values, self.spec.event.size, self.spec.event.struct,
            self.plan.use_ring, self.opts.buffer_pages, BATCH, self.stream.pending,
        )

    # -- reading maps ---------------------------------------------------------

    def read_stats(self):
        self.losses.read(self.program, self.functions)

    def read_percpu(self, name, key=0):
        """One entry of a per-CPU array: its bytes on each possible CPU."""
        table = self.map(name)
        return table.values(key.to_bytes(table.key_size, sys.byteorder))

    def read_table(self, name):
        """Every (key, value) of a hash map, as bytes."""
        return list(self.map(name).items())

    def read_counts(self, clear):
        """Rows of the in-kernel counts, busiest first, COUNT last."""
        counter = self.spec.counter
        table = self.map("counts")
        items = table.pop_all() if clear else list(table.items())
        rows = []
        for raw, value in items:
            try:
                values = counter.key.struct.unpack(raw[: counter.key.size])
                row = counter.decode(values, self.ctx)
            except Exception:
                self.losses.malformed += 1
                continue
            rows.append(tuple(row) + (int.from_bytes(value[:8], sys.byteorder),))
        rows.sort(key=lambda r: r[-1], reverse=True)
        if self.opts.top:
            rows = rows[: self.opts.top]
        return rows

    def print_counts(self, clear):
        columns = list(self.spec.counter.columns) + [Column("count", "COUNT", 8, "d", right=True)]
        title = time.strftime("%H:%M:%S") if self.opts.interval else None
        self.writer.summary(columns, self.read_counts(clear), title=title)
        self.writer.flush()

    # -- the loops ------------------------------------------------------------

    def run_counting(self):
        start = time.monotonic()
        deadline = start + self.opts.duration if self.opts.duration else None
        next_print = start + self.opts.interval if self.opts.interval else None
        with Stopper() as stopper:
            try:
                while not stopper.stop:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        break
                    if next_print is not None and now >= next_print:
                        with stopper.output():
                            self.print_counts(clear=True)
                        next_print += self.opts.interval
                    time.sleep(min(0.1, max(0.001, (deadline or now + 1) - now)))
                self.read_stats()
                with stopper.output():
                    self.print_counts(clear=bool(self.opts.interval))
            except StopWriting:  # stdout takes no more: drop what it holds
                silence_stdout()
            return self.final_report(stopper, buffer_losses=False)

    def run(self):
        """Poll until a signal, --duration or --max-events; returns the exit status."""
        if self.counting:
            return self.run_counting()
        deadline = time.monotonic() + self.opts.duration if self.opts.duration else None
        next_stats = time.monotonic() + STATS_EVERY_S
        writer, stream, poll = self.writer, self.stream, self.poll
        ended_ns = None  # when the loop ended, if no signal ended it
        with Stopper() as stopper:
            try:
                while not stopper.stop:
                    timeout = POLL_MS
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        timeout = max(1, min(POLL_MS, int(left * 1000)))
                    poll(timeout)
                    with stopper.output():
                        done = stream.drain()
                        writer.flush()
                    self.flushed_rows = stream.rows
                    now = time.monotonic()
                    if now >= next_stats:
                        self.read_stats()
                        with stopper.output():
                            self.losses.report_new(self.say)
                        next_stats = now + STATS_EVERY_S
                    if done:
                        break
                ended_ns = time.monotonic_ns()  # the clock of the events' times
                if not stream.done:
                    self._last_drain(stopper)
            except StopWriting:  # stdout takes no more: drop what it holds
                silence_stdout()
                # The batch being written, and rows written since the last
                # flush: some may have reached the output, maybe none.
                self.losses.abandoned = stream.handed - self.flushed_rows
            self._count_unprinted(stopper.stopped_ns or ended_ns or time.monotonic_ns())
            self.read_stats()
            return self.final_report(stopper)

    def _last_drain(self, stopper):
        """Events already in the buffer when the run ends count: read until
        it is empty, for at most LAST_DRAIN_S (what is left then is counted
        by _count_unprinted)."""
        end = time.monotonic() + LAST_DRAIN_S
        while True:
            got = self.poll(0)
            with stopper.output():
                done = self.stream.drain()
                self.writer.flush()
            self.flushed_rows = self.stream.rows
            if done or not got or got < BATCH or time.monotonic() >= end:
                return

    def _count_unprinted(self, ended_ns):
        """Events of the run (up to ended_ns, when it ended) that it did not
        print, because output was abandoned or the last drain ran out of
        time, are lost too. Events after the end, while the programs are
        still attached, are not the run's."""
        stream = self.stream
        if stream is None or stream.done:
            return
        left = self.losses.abandoned + len(stream.pending)
        left += sum(1 for v in stream.pending_values if v[0] <= ended_ns)
        stream.pending, stream.pending_values = [], []
        self.losses.add_unprinted(left + self.program.count_ready(ended_ns))

    def final_report(self, stopper, buffer_losses=True):
        """The losses and totals on stderr, and the exit status."""
        try:
            with stopper.output():  # stderr can be a pipe nobody reads, too
                if buffer_losses:
                    self.losses.report_new(self.say)
                self.losses.report_final(self.say, self.stream)
        except StopWriting:
            pass
        return self.losses.status()

    def close(self):
        if self.program is not None:
            self.program.close()
            self.program = None


def first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


def run(spec, opts, writer, err=sys.stderr):
    session = Session(spec, opts, writer, err)
    try:
        session.open()
        if not session.counting:
            writer.header()
            writer.flush()
        session.announce()
        return session.run()
    finally:
        session.close()
