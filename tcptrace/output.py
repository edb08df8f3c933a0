"""The one output layer: streaming table, CSV and JSON Lines, and tabulate
summaries for count modes.

stdout carries data only. Rows are written to Python's buffered stdout and
the runtime flushes once per poll batch, so a pipe sees them within one poll
interval without paying a write() per row.
"""

import ast
import builtins
import collections
import csv
import inspect
import json
import keyword
import math
import operator
import os
import re
import socket
import sys
import time

from . import net, tcpstate
from .spec import Column
from .stream import Decoded, each_row

FORMATS = ("table", "csv", "json")

TIME_COLUMN = Column("time", "TIME", 8, value="_clock.time()")
TIMESTAMP_COLUMN = Column("timestamp", "TIME(s)", 9, ".6f", value="_clock.since_first(_values[0])")


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

    def summary(self, columns, rows, title=None, redraw=False):
        """A count-mode table: all rows at once, so tabulate can size it.
        Only the columns this format shows (Column.table, .json, -x, -w);
        redraw: a table on a terminal replaces the previous one (top)."""
        raise NotImplementedError

    def _shown(self, columns, rows):
        keep = [i for i, c in enumerate(columns) if self._shows(c)]
        if len(keep) == len(columns):
            return columns, rows
        return [columns[i] for i in keep], [[row[i] for i in keep] for row in rows]

    def histograms(self, hists, unit, title=None):
        """log2 histograms (hist.py): hists is [(label, [(low, high,
        count)])], label ((key, value), ...) naming each; unit is (JSON
        name of the value, table unit)."""
        raise NotImplementedError


class NoFastPath(Exception):
    """Why a table layout has no derived per-event path (one sentence)."""


# What a column's value expression may name besides the event's fields, ctx
# and its tool module's names: the conversions every tool shares, each a
# dict whose lookup is one subscript in C.
VALUE_NAMES = {"ADDRESS": net.ADDRESS, "COMM": net.COMM, "IP_VERSION": net.IP_VERSION, "STATE": tcpstate.NAME}

# Inside the derived loop: the event's values tuple and the writer's clock.
_LOOP_NAMES = {"_values", "_clock"}


class DerivedTable:
    """A tool's per-event table path, generated from its column
    declarations for one layout (as dataclasses generate __init__): one
    loop that unpacks each event, evaluates the shown columns' values and
    printf-formats the line, without decode()'s row, a column pick and a
    call per event in between. An event with a blank (None) or an odd
    value takes the careful path: decode() and the writer's line(), so
    what it writes is exactly what decode() and writer.batch() write.
    `source` is the generated code; `careful` counts the events that took
    the careful path."""

    def __init__(self, writer, fill, source):
        self.writer, self.fill, self.source = writer, fill, source
        self.careful = 0

    def __call__(self, samples, decode, ctx):
        lines = []
        done = self.fill(samples, decode, ctx, lines.append, self.writer.line)
        if done is None:  # a per-batch value failed for this ctx: decode() decides each event
            return self.writer.batch(samples, decode, ctx)
        malformed, careful = done
        self.careful += careful
        return self.writer.write_lines(lines, malformed)


def _names(tree):
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound


class _HoistCtxCalls(ast.NodeTransformer):
    """f(ctx) -> a local computed once per batch: ctx lives for the run."""

    def __init__(self, hoisted):
        self.hoisted = hoisted  # source -> local name

    def visit_Call(self, node):
        self.generic_visit(node)
        if (len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Name)
                and node.args[0].id == "ctx"):
            text = ast.unparse(node)
            name = self.hoisted.setdefault(text, f"_batch{len(self.hoisted)}")
            return ast.copy_location(ast.Name(name, ast.Load()), node)
        return node


_SHARED = (ast.Subscript, ast.Call, ast.BoolOp)


def _shareable(node):
    """A lookup, call or test of names and constants (ADDRESS[family],
    parse(family, hdr), known and trusted): a column value is a pure
    function of the event, so such a part is the same in every column of
    one event. Evaluating it where a column would not is harmless: a
    failure only sends the event down the careful path."""
    if isinstance(node, (ast.Name, ast.Constant)):
        return True
    if isinstance(node, ast.Subscript):
        return _shareable(node.value) and isinstance(node.slice, (ast.Name, ast.Constant))
    if isinstance(node, ast.BoolOp):
        return all(isinstance(v, (ast.Name, ast.Constant)) for v in node.values)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords
            and all(isinstance(a, (ast.Name, ast.Constant)) for a in node.args))


class _Share(ast.NodeTransformer):
    """A part that several columns of an event compute -> one local."""

    def __init__(self, shared):
        self.shared = shared  # source -> local name

    def visit(self, node):
        name = self.shared.get(ast.unparse(node)) if isinstance(node, _SHARED) else None
        if name:
            return ast.copy_location(ast.Name(name, ast.Load()), node)
        return self.generic_visit(node)


def derive_table(spec, writer):
    """The derived per-event path of spec's table in writer's layout.
    Raises NoFastPath, saying why, when the layout cannot have one.

    The generated source is made of the tool's own declarations (field
    names checked as identifiers, column expressions parsed as Python);
    no option value or other user input is ever part of it."""
    if writer.percent is None:
        col = next(c for c, w in zip(writer.all_columns, writer.widths)
                   if c.constant is None and _percent(c, w) is None)
        raise NoFastPath(f"column {col.key}'s format {col.spec!r} has no printf equivalent")
    fields = list(spec.event.names)
    bad = [f for f in fields if not f.isidentifier() or keyword.iskeyword(f) or f.startswith("_") or f == "ctx"]
    if bad:
        raise NoFastPath(f"event field {bad[0]!r} cannot be a local name of the generated loop")
    # The tool module's names: those its decode() sees (through a wrapper
    # made with functools.wraps too).
    module = getattr(inspect.unwrap(spec.decode), "__globals__", {})
    namespace = {**VALUE_NAMES, **module, "_clock": writer.clock}
    known = set(fields) | set(namespace) | set(dir(builtins)) | _LOOP_NAMES | {"ctx"}
    hoisted = {}
    hoist = _HoistCtxCalls(hoisted)
    values, checked, free, trees = [], [], set(), []
    for col in writer.all_columns:
        if col.constant is not None:
            continue  # its text is in the format
        if not col.value:
            raise NoFastPath(f"column {col.key} declares no value (Column.value)")
        try:
            tree = ast.parse(col.value, mode="eval")
        except SyntaxError as e:
            raise NoFastPath(f"column {col.key}'s value is not a Python expression: {e.msg}") from None
        unknown = sorted(_names(tree) - known)
        if unknown:
            raise NoFastPath(f"column {col.key}'s value names {unknown[0]}, neither an event field nor a known name")
        free |= _names(tree)
        trees.append((col, hoist.visit(tree)))
    parts = collections.Counter(ast.unparse(node) for _col, tree in trees for node in ast.walk(tree)
                                if isinstance(node, _SHARED) and _shareable(node))
    shared, share = {}, _Share({})
    for text in sorted((t for t, n in parts.items() if n > 1), key=len):  # inner parts first
        name = f"_same{len(shared)}"
        shared[ast.unparse(share.visit(ast.parse(text, mode="eval")))] = name
        share.shared[text] = name
    for col, tree in trees:
        text = ast.unparse(share.visit(tree))
        if col.nullable and (col.spec or "s") == "s":
            # A blank would print as "None" under %s (a numeric conversion
            # of None raises instead): such a column is looked at first.
            name = f"_text{len(checked)}"
            checked.append((name, text))
            text = name
        values.append(text)
    fast = [f"_add(_percent % ({', '.join(values)},))", "continue"]
    if checked:
        fast = [f"if {' and '.join(f'{name} is not None' for name, _ in checked)}:", *("    " + s for s in fast)]
    fast = ["            " + s for s in fast]
    # The names the loop reads become keyword defaults: local variables,
    # the cheapest lookup Python has.
    bound = sorted((free - set(fields) - {"ctx", "_values"}) & set(namespace)) + ["_percent"]
    src = [f"def fill(_samples, _decode, ctx, _add, _careful, *, {', '.join(f'{n}={n}' for n in bound)}):"]
    if hoisted:
        src += ["    try:"]
        src += [f"        {name} = {text}" for text, name in hoisted.items()]
        src += ["    except Exception:", "        return None"]
    src += [
        "    _malformed = _slow = 0",
        "    for _values in _samples:",
        f"        {', '.join(fields)}, = _values",
        "        try:",
        *(f"            {name} = {text}" for text, name in shared.items()),
        *(f"            {name} = {text}" for name, text in checked),
        *fast,
        "        except Exception:",
        "            pass",
        "        _slow += 1",
        "        try:",
        "            _row = _decode(_values, ctx)",
        "        except Exception:",
        "            _malformed += 1",
        "            continue",
        "        if _row is not None:",
        "            _add(_careful(_values[0], _row))",
        "    return _malformed, _slow",
    ]
    source = "\n".join(src) + "\n"
    namespace["_percent"] = writer.percent
    exec(compile(source, f"<tcptrace {spec.name} table>", "exec"), namespace)
    return DerivedTable(writer, namespace["fill"], source)


def batch_for(spec, writer):
    """The per-batch path a run writes events with: for a table, the path
    derived from the tool's column declarations when its layout has one,
    else the writer's batch()."""
    if isinstance(writer, TableWriter):
        try:
            return derive_table(spec, writer)
        except NoFastPath:
            pass
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

    def summary(self, columns, rows, title=None, redraw=False):
        from tabulate import tabulate

        columns, rows = self._shown(columns, rows)
        if redraw:
            self.stream.write("\033[H\033[2J")  # cursor home, clear the screen
        if title:
            self.stream.write(title + "\n")
        body = [["-" if v is None else v for v in row] for row in rows]
        self.stream.write(
            tabulate(body, headers=[c.header for c in columns], tablefmt="plain",
                     disable_numparse=True) + "\n"
        )


    def histograms(self, hists, unit, title=None):
        from . import hist

        if title:
            self.stream.write(title + "\n")
        for label, rows in hists:
            if label:
                self.stream.write("\n" + ", ".join(f"{key} = {value}" for key, value in label) + "\n")
            self.stream.write(hist.render(rows, unit[1]) or f"     {unit[1]:<19} : no samples\n")


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

    def summary(self, columns, rows, title=None, redraw=False):
        columns, rows = self._shown(columns, rows)
        keys = [c.key for c in columns]
        if keys != getattr(self, "_keys_written", None):  # one header for every interval's rows
            self.csv.writerow(keys)
            self._keys_written = keys
        for row in rows:
            self.csv.writerow(["" if v is None else v for v in row])

    def histograms(self, hists, unit, title=None):
        """One CSV row per bucket: the label's values, low, high, count."""
        keys = [key for key, _value in hists[0][0]] if hists else []
        self.csv.writerow(keys + ["hist", "low", "high", "count"])
        for label, rows in hists:
            for low, high, count in rows:
                self.csv.writerow([value for _key, value in label] + [unit[0], low, high, count])


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

    def summary(self, columns, rows, title=None, redraw=False):
        columns, rows = self._shown(columns, rows)
        keys = [c.key for c in columns]
        now = time.monotonic_ns()  # the same clock as the kernel's event times
        for row in rows:
            self.stream.write(self._line(now, keys, row))

    def histograms(self, hists, unit, title=None):
        """One object per histogram: hist (the value's name), its label's
        keys, buckets as [low, high, count] and count, their sum."""
        now = time.monotonic_ns()
        for label, rows in hists:
            keys = ["hist", *(key for key, _value in label), "buckets", "count"]
            vals = [unit[0], *(value for _key, value in label), [list(r) for r in rows], sum(r[2] for r in rows)]
            self.stream.write(self._line(now, keys, vals))


WRITERS = {"table": TableWriter, "csv": CsvWriter, "json": JsonWriter}


def writer(kind, stream, columns, **kwargs):
    return WRITERS[kind](stream, columns, **kwargs)
