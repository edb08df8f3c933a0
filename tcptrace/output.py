"""The one output layer: streaming table, CSV and JSON Lines, and tabulate
summaries for count modes.

stdout carries data only. Rows are written to Python's buffered stdout and
the runtime flushes once per poll batch, so a pipe sees them within one poll
interval without paying a write() per row.
"""

import csv
import functools
import json
import math
import operator
import os
import re
import socket
import sys
import time

from .spec import Column
from .stream import Decoded, each_row

FORMATS = ("table", "csv", "json")

TIME_COLUMN = Column("time", "TIME", 8)
TIMESTAMP_COLUMN = Column("timestamp", "TIME(s)", 9, ".6f")


def _cell(col, width, value):
    if value is None:
        value = "-"
        spec = ""
    else:
        spec = col.spec
        if isinstance(value, float) and not math.isfinite(value):
            value, spec = str(value), ""
    if col.truncate and isinstance(value, str):
        value = value[:width]
    try:
        text = format(value, spec)
    except (ValueError, TypeError):
        text = str(value)
    if not width:
        return text
    return text.rjust(width) if col.right else text.ljust(width)


def _percent(col, width):
    """The printf-style conversion of a column, or None when its format
    spec has no exact printf equivalent."""
    spec = col.spec or "s"
    if not re.fullmatch(r"(\.\d+)?[dxfs]", spec):
        return None
    if spec == "s" and col.truncate and width:
        spec = f".{width}s"
    if not width:
        return "%" + spec
    return f"%{'' if col.right else '-'}{width}{spec}"


class Clock:
    """TIME and TIME(s) values for an event: wall-clock HH:MM:SS when the
    event is printed (as bcc's -T) and seconds since the first event, from
    the kernel's monotonic timestamps (as bcc's -t)."""

    def __init__(self):
        self.first_ns = None
        self._second = None
        self._text = ""

    def time(self):
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._text = time.strftime("%H:%M:%S", time.localtime(now))
        return self._text

    def since_first(self, ts_ns):
        if self.first_ns is None:
            self.first_ns = ts_ns
        return (ts_ns - self.first_ns) / 1e9


class Stamps:
    """The start of a JSON object: the timestamps of a kernel time
    (CLOCK_MONOTONIC, which bpf_ktime_get_ns() reads), then what is the same
    on every line. `ts_mono` is those exact seconds as a JSON number, `ts`
    the wall-clock time, RFC 3339 UTC with microseconds, from one offset
    between the two clocks taken at start (a later step of the wall clock is
    not followed, so the stamps of one run stay ordered)."""

    def __init__(self, constant=""):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        self.offset_ns = wall - (before + after) // 2
        self._offset_s, self._offset_sub = divmod(self.offset_ns, 1_000_000_000)
        self.constant = constant
        self._second = None
        self._wall = ("", "")

    def _texts(self, second):
        self._second = second
        first = second + self._offset_s
        self._wall = tuple('{"ts":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + "."
                           for s in (first, first + 1))

    def head(self, ts_ns):
        """'{"ts":...,"ts_mono":...,<constant>,': one division per line, the
        date text once per second, digits by slicing "1<9 digits>" (format
        specs cost twice as much)."""
        second, ns = divmod(ts_ns, 1_000_000_000)
        if second != self._second:
            self._texts(second)
        sub = ns + self._offset_sub
        if sub < 1_000_000_000:
            wall = self._wall[0]
            sub += 1_000_000_000
        else:
            wall = self._wall[1]
        return f'{wall}{str(sub)[1:7]}Z","ts_mono":{second}.{str(ns + 1_000_000_000)[1:]},{self.constant},'


def silence_stdout():
    """Point stdout at /dev/null: after a closed pipe, or one that takes no
    more, the interpreter's final flush can then neither raise nor block."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class Writer:
    def __init__(self, stream, columns, show_time=False, show_timestamp=False, wide=False, extended=False,
                 tool=None):
        self.stream = stream
        self.tool = tool  # the subcommand, named in every JSON object
        self.clock = Clock()
        self.show_time = show_time
        self.show_timestamp = show_timestamp
        self.wide = wide
        self.extended = extended
        # Positions, in decode()'s row, of the columns this format shows.
        self.index = [i for i, c in enumerate(columns) if self._shows(c)]
        self.columns = [columns[i] for i in self.index]
        prefix = []
        if show_time:
            prefix.append(TIME_COLUMN)
        if show_timestamp:
            prefix.append(TIMESTAMP_COLUMN)
        self.all_columns = prefix + self.columns
        self.rows = 0

    def _shows(self, col):
        return col.json and (self.extended or not col.extended)

    def _prefix(self, ts_ns):
        out = []
        if self.show_time:
            out.append(self.clock.time())
        if self.show_timestamp:
            out.append(self.clock.since_first(ts_ns))
        return out

    def header(self):
        pass

    def batch(self, samples, decode, ctx):
        """Decode and write a batch of samples; returns (rows written,
        samples decode() could not make sense of)."""
        return each_row(samples, decode, ctx, self.row)

    def write_lines(self, lines, malformed=0):
        """The end of a batch path: its lines in one write; returns what
        batch() returns."""
        self.stream.write("".join(lines))
        self.rows += len(lines)
        return len(lines), malformed

    def flush(self):
        self.stream.flush()

    def summary(self, columns, rows, title=None):
        """A count-mode table: all rows at once, so tabulate can size it."""
        raise NotImplementedError


def own_table_path(*picks, when=None):
    """Makes a tool's own table path (ToolSpec.table_batch) from a loop
    fill(add, samples, percent, layout, careful, decode, ctx) that adds one
    printf-formatted line per sample. picks are the column picks the loop
    was made for (layout is the index of the one this table formats); any
    other layout, -T/-t, or when(ctx) false, takes the writer's batch()."""
    def wrap(fill):
        def table_batch(writer, samples, decode, ctx):
            if not writer.fast or writer.picked not in picks or (when is not None and not when(ctx)):
                return writer.batch(samples, decode, ctx)
            lines = []
            fill(lines.append, samples, writer.percent, picks.index(writer.picked), writer.line, decode, ctx)
            return writer.write_lines(lines)
        table_batch.__doc__ = fill.__doc__
        return table_batch
    return wrap


def batch_for(spec, writer):
    """The per-batch path a run writes events with: the tool's own table
    path for a table, else the writer's batch()."""
    if spec.table_batch is not None and isinstance(writer, TableWriter):
        return functools.partial(spec.table_batch, writer)
    return writer.batch


class TableWriter(Writer):
    def _shows(self, col):
        return col.table and (self.wide or not col.wide_only) and (self.extended or not col.extended)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cols = self.all_columns
        self.widths = [(c.wide or c.width) if self.wide else c.width for c in cols]
        self.widths[-1] = 0
        # The fast path: one format string for a row without blanks.
        parts = []
        for col, width in zip(cols, self.widths):
            align = ">" if col.right else "<"
            cut = f".{width}" if (col.truncate and width) else ""
            parts.append("{:%s%s%s%s}" % (align, width or "", cut, col.spec))
        self.template = " ".join(parts)
        # Faster still, for rows without blanks: printf-style formatting, a
        # column picker in C, and constant columns written into the format.
        percent, picked = [], []
        positions = [None] * (len(cols) - len(self.index)) + self.index  # None: -T/-t's columns
        for i, col, width in zip(positions, cols, self.widths):
            if col.constant is not None:
                text = _cell(col, width, col.constant)
                percent.append(text.replace("%", "%%"))
            else:
                percent.append(_percent(col, width))
                picked.append(i)
        self.percent = " ".join(percent) + "\n" if None not in percent else None
        self.picked = tuple(picked)  # the positions in decode()'s row that percent formats
        self.pick = operator.itemgetter(*picked) if len(picked) > 1 and None not in picked else None
        # A blank (None) fails a numeric conversion (TypeError: the careful
        # path writes "-"), but %s would print it as "None": only rows with
        # a nullable text column need looking at.
        self.blank_text = any(c.nullable and (c.spec or "s") == "s" for c in cols)
        self.fast = bool(self.percent and self.pick and not (self.show_time or self.show_timestamp))

    def header(self):
        cells = [
            h.rjust(w) if c.right else h.ljust(w)
            for c, w, h in zip(self.all_columns, self.widths, (c.header for c in self.all_columns))
        ]
        self.stream.write(" ".join(cells).rstrip() + "\n")

    def line(self, ts_ns, values):
        """The careful path: any value, blanks as "-"."""
        vals = self._prefix(ts_ns) if (self.show_time or self.show_timestamp) else []
        vals += [values[i] for i in self.index]
        try:
            text = self.template.format(*vals)
        except (ValueError, TypeError):
            text = " ".join(_cell(c, w, v) for c, w, v in zip(self.all_columns, self.widths, vals))
        return text + "\n"

    def row(self, ts_ns, values):
        if self.fast:
            picked = self.pick(values)
            if not (self.blank_text and None in picked):
                try:
                    self.stream.write(self.percent % picked)
                    self.rows += 1
                    return
                except (ValueError, TypeError, OverflowError):
                    pass  # a blank or an odd value (%d of inf): the careful path
        self.stream.write(self.line(ts_ns, values))
        self.rows += 1

    def batch(self, samples, decode, ctx):
        """The per-event path of a streaming table: decode, pick and
        printf-format each row, one write for the batch."""
        if not self.fast:
            return super().batch(samples, decode, ctx)
        pick, percent, careful = self.pick, self.percent, self.line
        check = self.blank_text
        lines = []
        add = lines.append
        rows = Decoded(samples, decode, ctx)
        for ts, row in rows:
            try:
                picked = pick(row)
                if check and None in picked:
                    raise TypeError
                add(percent % picked)
            except (ValueError, TypeError, OverflowError):
                add(careful(ts, row))
        return self.write_lines(lines, rows.malformed)

    def summary(self, columns, rows, title=None):
        from tabulate import tabulate

        if title:
            self.stream.write(title + "\n")
        body = [["-" if v is None else v for v in row] for row in rows]
        self.stream.write(
            tabulate(body, headers=[c.header for c in columns], tablefmt="plain",
                     disable_numparse=True) + "\n"
        )


class CsvWriter(Writer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.csv = csv.writer(self.stream, lineterminator="\n")

    def header(self):
        self.csv.writerow([c.key for c in self.all_columns])

    def row(self, ts_ns, values):
        vals = self._prefix(ts_ns) + [values[i] for i in self.index]
        self.csv.writerow(["" if v is None else v for v in vals])
        self.rows += 1

    def summary(self, columns, rows, title=None):
        self.csv.writerow([c.key for c in columns])
        for row in rows:
            self.csv.writerow(["" if v is None else v for v in row])


SCHEMA_VERSION = 1  # tcptrace/schema/events-v1.json; bumped when a key changes meaning or goes away
ENVELOPE = ("ts", "ts_mono", "host", "tool", "schema")  # the keys every JSON object starts with


def _encoder():
    """json.dumps(obj, separators=(",", ":"), ensure_ascii=False) for the
    flat objects of a row: JSONEncoder.encode makes a new C encoder on every
    call (half its cost for a row); this makes it once. Without the C
    accelerator, JSONEncoder.encode itself."""
    from json import encoder as enc

    plain = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    if enc.c_make_encoder is None:
        return plain.encode
    # markers=None: no cycle check (a row holds no containers); allow_nan as json.dumps.
    make = enc.c_make_encoder(None, plain.default, enc.encode_basestring, None, ":", ",", False, False, True)
    join = "".join
    return lambda obj: join(make(obj, 0))


class JsonWriter(Writer):
    """JSON Lines. Every object starts with the envelope: `ts`, `ts_mono`,
    `host`, `tool`, `schema` (see tcptrace/events.py), so that the lines of
    many hosts and subcommands can be merged and told apart."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys = [c.key for c in self.all_columns]
        self.dumps = _encoder()
        host = self.dumps(socket.gethostname())
        tool = f',"tool":{self.dumps(self.tool)}' if self.tool else ""
        self.head = Stamps(f'"host":{host}{tool},"schema":{SCHEMA_VERSION}').head
        # The batch path's column picker (without -T/-t: their values are not in the row).
        plain = not (self.show_time or self.show_timestamp) and len(self.index) > 1
        self.pick = operator.itemgetter(*self.index) if plain else None

    def _line(self, ts_ns, keys, vals):
        body = self.dumps(dict(zip(keys, vals)))
        return self.head(ts_ns) + body[1:] + "\n" if len(body) > 2 else self.head(ts_ns)[:-1] + "}\n"

    def row(self, ts_ns, values):
        vals = self._prefix(ts_ns) + [values[i] for i in self.index]
        # A tool has at least one JSON column: the body is never "{}".
        self.stream.write(self.head(ts_ns) + self.dumps(dict(zip(self.keys, vals)))[1:] + "\n")
        self.rows += 1

    def batch(self, samples, decode, ctx):
        """The per-event path: decode, pick and encode each row, one write
        for the batch."""
        if self.pick is None:
            return super().batch(samples, decode, ctx)
        head, dumps, keys, pick = self.head, self.dumps, self.keys, self.pick
        lines = []
        add = lines.append
        rows = Decoded(samples, decode, ctx)
        for ts, row in rows:
            add(head(ts) + dumps(dict(zip(keys, pick(row))))[1:] + "\n")
        return self.write_lines(lines, rows.malformed)

    def summary(self, columns, rows, title=None):
        keys = [c.key for c in columns]
        now = time.monotonic_ns()  # the same clock as the kernel's event times
        for row in rows:
            self.stream.write(self._line(now, keys, row))


WRITERS = {"table": TableWriter, "csv": CsvWriter, "json": JsonWriter}


def writer(kind, stream, columns, **kwargs):
    return WRITERS[kind](stream, columns, **kwargs)
