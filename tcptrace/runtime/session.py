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
from .priority import Priority
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
        self.priority = Priority(self.verbose)
        self.max_fill = None  # of the buffer, at the reads; None when it cannot tell
        counter = spec.counter
        # Histograms instead of rows, when the tool's options ask for them.
        self.histogram = counter.histogram if counter and counter.histogram and \
            counter.histogram.wanted(opts.tool) else None
        self.counting = bool(counter and (opts.count or counter.always or self.histogram))
        self.buffered = buffer and not self.counting
        self.attached = []  # the tracepoints attached, in the spec's order
        self.generation = 0  # counter.generations: the one the kernel counts under
        self._since = self._since_wall = None  # when the interval being counted began

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
        if "cgroup_id" in self.spec.event.names:
            from ..workload import Resolver

            self.ctx.workload = Resolver()
        used = [tp for tp in self.spec.tracepoints if self._used(tp)]
        self.program = build.load(self.plan, f"`tcptrace {self.spec.name}`", [tp.function for tp in used],
                                  self.verbose, self.err, [tp.function for tp in used if tp.name in self.plan.raw])
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

    def _used(self, tp):
        """Whether the run attaches to tp: it is on this kernel and, for a
        stand-in, what it stands in for is not."""
        formats = self.plan.formats
        return tp.name in formats and not (tp.instead_of and all(n in formats for n in tp.instead_of))

    def _attach(self):
        root = tracefs.find_mount()  # the live tracefs: the formats may come from elsewhere, the IDs may not
        for tp in self.spec.tracepoints:
            if not self._used(tp):
                continue
            if tp.instead_of and tp.why:
                gone = ", ".join(n for n in tp.instead_of if n not in self.plan.formats)
                self.say(f"this kernel has no {gone} (Linux {tp_since(tp.instead_of)}+): {tp.why}")
            try:
                raw = tp.name in self.plan.raw
                self.program.attach(root, tp.name, tp.function, raw=raw)
                if raw:
                    self.verbose(f"{tp.name} taken raw: its arguments, without a record written first")
                self.attached.append(tp.name)
                self.ctx.tracepoints = tuple(self.attached)
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

    def _entries(self, name, layout, clear):
        """(key values, value bytes) of a hash map, emptied when clear; a
        key that does not unpack is malformed."""
        table = self.map(name)
        for raw, value in table.pop_all() if clear else list(table.items()):
            try:
                yield layout.struct.unpack(raw[: layout.size]), value
            except Exception:
                self.losses.malformed += 1

    def _take_generation(self):
        """Advance the generation the kernel counts under, wait until no
        program can still be writing under the old one, and return the name
        of the old one's hash (Counter.generations)."""
        old = self.generation
        self.generation = (old + 1) & 0xFFFFFFFF
        self.map("generation").update((0).to_bytes(4, sys.byteorder), self.generation.to_bytes(4, sys.byteorder))
        if not rcu_grace_period():
            time.sleep(GRACE_S)
        return "counts_odd" if old & 1 else "counts"

    def _interval(self):
        """(start, seconds) of the interval that ends now: start in seconds
        of the wall clock, seconds measured on the monotonic one."""
        now, wall = time.monotonic(), time.time()
        if self._since is None:
            self._since, self._since_wall = now, wall
        interval = (self._since_wall, now - self._since)
        self._since, self._since_wall = now, wall
        return interval

    def _default_top(self):
        """Counter.top for a table: the rows that fit a terminal, else its
        number; JSON and CSV get every row."""
        counter = self.spec.counter
        stream = self.writer.stream
        if self.opts.output != "table":
            return 0
        if counter.redraw and _isatty(stream):
            import os

            try:
                return max(1, os.get_terminal_size(stream.fileno()).lines - 3)  # title, header, prompt
            except (AttributeError, ValueError, OSError):
                pass
        return counter.top

    def count_columns(self):
        counter = self.spec.counter
        count = [Column("count", counter.count_header, 8, "d", right=True)] if counter.value is None or \
            counter.count else []
        return list(counter.columns) + count

    def read_counts(self, clear):
        """Rows of the in-kernel counts, busiest first, COUNT last (when
        the counter has one); the columns and the title line are left in
        self.columns and self.title."""
        counter = self.spec.counter
        name = self._take_generation() if counter.generations else "counts"
        interval = self._interval()
        rows = []
        for key, value in self._entries(name, counter.key, clear or counter.generations):
            try:
                if counter.value is None:
                    row = tuple(counter.decode(key, self.ctx)) + (int.from_bytes(value[:8], sys.byteorder),)
                else:
                    values = counter.value.struct.unpack(value[: counter.value.size])
                    row = tuple(counter.decode(key, values, self.ctx))
                    if counter.count:
                        row += (values[counter.value.names.index(counter.count)],)
            except Exception:
                self.losses.malformed += 1
                continue
            rows.append(row)
        self.columns = self.count_columns()
        if counter.finish:
            self.columns, rows = counter.finish(self.opts.tool, self.columns, rows, interval, self.ctx)
        rank = [c.key for c in self.columns].index(counter.rank) if counter.rank else -1
        rows.sort(key=lambda r: r[rank] or 0, reverse=True)
        self.title = counter.title(rows, interval, self.ctx) if counter.title else None
        top = self.opts.top or self._default_top()
        if top:
            rows = rows[:top]
        return rows

    def read_histograms(self, clear):
        """[(label, [(low, high, count)])], the fullest histogram first; a
        per-CPU value is the sum of its CPUs' u64s."""
        from .. import hist

        spec = self.histogram
        slots = {}
        for key, value in self._entries("hist", spec.key, clear):
            count = sum(int.from_bytes(value[i : i + 8], sys.byteorder) for i in range(0, len(value) - 7, 8))
            group = slots.setdefault(key[:-1], {})
            group[key[-1]] = group.get(key[-1], 0) + count
        out = [(spec.label(self.opts.tool, key, self.ctx), hist.buckets(group)) for key, group in slots.items()]
        out.sort(key=lambda h: (-hist.total(h[1]), h[0]))
        return out[: self.opts.top] if self.opts.top else out

    def print_counts(self, clear):
        title = time.strftime("%H:%M:%S") if self.opts.interval else None
        if self.histogram:
            self.writer.histograms(self.read_histograms(clear), self.histogram.unit(self.opts.tool), title=title)
        else:
            counter = self.spec.counter
            rows = self.read_counts(clear)
            redraw = bool(counter.redraw and counter.redraw(self.opts.tool) and _isatty(self.writer.stream))
            self.writer.summary(self.columns, rows, title=self.title or title, redraw=redraw)
        self.writer.flush()

    # -- the loops ------------------------------------------------------------

    def run_counting(self):
        start = self._since = time.monotonic()
        self._since_wall = time.time()
        deadline = start + self.opts.duration if self.opts.duration else None
        next_print = start + self.opts.interval if self.opts.interval else None
        counter = self.spec.counter
        limit = (self.opts.tool.get(counter.intervals) or 0) if counter and counter.intervals else 0
        printed = 0
        with Stopper() as stopper:
            try:
                while not stopper.stop and not (limit and printed >= limit):
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        break
                    if next_print is not None and now >= next_print:
                        with stopper.output():
                            self.print_counts(clear=True)
                        printed += 1
                        next_print += self.opts.interval
                        continue
                    time.sleep(min(0.1, max(0.001, (deadline or now + 1) - now), max(0.001, (next_print or now + 1) - now)))
                self.read_stats()
                if not (limit and printed >= limit):
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
        fill = self.program.fill
        self.priority.raise_()
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
                    filled = fill()
                    if filled is not None and (self.max_fill is None or filled > self.max_fill):
                        self.max_fill = filled
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
                    if self.max_fill is not None:
                        self.verbose(f"the buffer was at most {self.max_fill:.0%} full when read "
                                     "(--buffer-pages sizes it)")
                self.losses.report_final(self.say, self.stream)
                self._report_hidden()
        except StopWriting:
            pass
        return self.losses.status()

    def _report_hidden(self):
        """Events the program left out on purpose: not losses, but said."""
        for name, what in self.spec.hidden if self.program is not None else ():
            try:
                count = sum(int.from_bytes(v, sys.byteorder) for v in self.read_percpu(name))
            except KeyError:  # not in this run's program (the option that hides them is off)
                continue
            if count:
                self.say(f"{count} {what}")

    def close(self):
        self.priority.restore()
        if self.program is not None:
            self.program.close()
            self.program = None


# How long a read of a generation waits where the kernel refuses membarrier
# (nohz_full): a tracepoint's programs run for microseconds.
GRACE_S = 0.05
MEMBARRIER_CMD_GLOBAL = 1
_MEMBARRIER_NR = {"x86_64": 324, "aarch64": 283, "ppc64le": 365, "s390x": 356, "riscv64": 283}


def rcu_grace_period():
    """Wait until every BPF program running now on any CPU has returned;
    False where the kernel will not say. MEMBARRIER_CMD_GLOBAL is
    synchronize_rcu(), and the programs of a tracepoint run inside one RCU
    read-side section (trace_call_bpf)."""
    import ctypes
    import platform

    nr = _MEMBARRIER_NR.get(platform.machine())
    if nr is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(nr, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def tp_since(names):
    from ..tracepoints import since

    return max((since(n) for n in names), key=lambda v: tuple(int(x) for x in v.split(".")))


def first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


def run(spec, opts, writer, err=sys.stderr):
    session = Session(spec, opts, writer, err)
    try:
        session.open()
        # Before anything reaches stdout: a reader that is gone or a full
        # disk must not hide that the programs were attached.
        session.announce()
        if not session.counting:
            writer.header()
            writer.flush()
        return session.run()
    finally:
        session.close()
