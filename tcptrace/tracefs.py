"""Tracepoint format files: where they live and what they say.

A format file (events/<category>/<name>/format) is the kernel's own
description of a tracepoint's record: each field's C type, offset and size,
and a `print fmt` line whose __print_symbolic() tables name the values of
enum fields (states, reset reasons) for that very kernel. Programs are
generated from it, so they only touch fields the running kernel has.
"""

import os
import re
from dataclasses import dataclass, field

TRACEFS_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

_FIELD_RE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>-?\d+);"
)
_SYMBOLIC_RE = re.compile(r"__print_symbolic\(\s*REC->(?P<field>\w+)\s*,")
_PAIR_RE = re.compile(r'\{\s*(?P<value>-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*"(?P<name>[^"]*)"\s*\}')


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str  # the declared type, e.g. "__u16", "const void *", "enum sk_rst_reason"
    offset: int
    size: int
    signed: bool
    array: int = 0  # element count for a fixed array, 0 for a scalar

    @property
    def is_array(self):
        return self.array > 0

    @property
    def is_data_loc(self):
        return self.ctype.startswith("__data_loc")


@dataclass
class Format:
    category: str
    name: str
    fields: list
    print_fmt: str = ""
    id: int = 0
    symbols: dict = field(default_factory=dict)  # field name -> {value: name}

    @property
    def tracepoint(self):
        return f"{self.category}:{self.name}"

    def field(self, name):
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def has(self, name, size=None):
        f = self.field(name)
        return f is not None and (size is None or f.size == size)


def _parse_decl(decl):
    """Split a C declaration such as 'const void * skaddr' or '__u8 saddr[28]'."""
    decl = decl.strip()
    array = 0
    m = re.match(r"^(?P<rest>.*?)\[(?P<n>[^\]]*)\]$", decl)
    if m:
        decl = m.group("rest").strip()
        n = m.group("n").strip()
        array = int(n) if n.isdigit() else -1  # -1: sized by an expression
    m = re.match(r"^(?P<type>.*?)(?P<name>[A-Za-z_]\w*)$", decl)
    if not m:
        raise ValueError(f"cannot parse field declaration {decl!r}")
    return m.group("type").strip(), m.group("name"), array


def _symbol_tables(print_fmt):
    """The numeric __print_symbolic tables of a print fmt line, by field name.

    Entries whose key is a symbol (e.g. { TCP_ESTABLISHED, "..." }) carry no
    number and are skipped: those tables are covered by tcpstate.
    """
    tables = {}
    for m in _SYMBOLIC_RE.finditer(print_fmt):
        depth, i = 1, m.end()
        start = i
        # Walk to the closing parenthesis of this __print_symbolic( call.
        while i < len(print_fmt) and depth:
            c = print_fmt[i]
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif c == '"':
                i = print_fmt.index('"', i + 1)
            i += 1
        body = print_fmt[start:i]
        pairs = {int(p.group("value"), 0): p.group("name") for p in _PAIR_RE.finditer(body)}
        if pairs:
            tables.setdefault(m.group("field"), {}).update(pairs)
    return tables


def parse_format(text, category="", name=""):
    fields = []
    print_fmt = ""
    fmt_id = 0
    for line in text.splitlines():
        if line.startswith("name:") and not name:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            fmt_id = int(line.split(":", 1)[1].strip() or 0)
        elif line.startswith("print fmt:"):
            print_fmt = line.split(":", 1)[1].strip()
        else:
            m = _FIELD_RE.match(line)
            if m:
                ctype, fname, array = _parse_decl(m.group("decl"))
                fields.append(
                    Field(
                        name=fname,
                        ctype=ctype,
                        offset=int(m.group("offset")),
                        size=int(m.group("size")),
                        signed=m.group("signed") == "1",
                        array=array,
                    )
                )
    if not fields:
        raise ValueError(f"no fields in the format of {category}:{name}")
    return Format(category, name, fields, print_fmt, fmt_id, _symbol_tables(print_fmt))


class FormatSource:
    """Reads formats from a tracefs mount (events/<cat>/<name>/format) or
    from a directory of saved files (<cat>/<name>.format), the layout kept as
    test data for other kernels."""

    def __init__(self, root, hidden=()):
        self.root = root
        self.hidden = set(hidden)  # tracepoints to treat as absent (a test seam)
        self._cache = {}

    def _path(self, category, name):
        live = os.path.join(self.root, "events", category, name, "format")
        if os.path.isdir(os.path.join(self.root, "events")):
            return live
        return os.path.join(self.root, category, name + ".format")

    def load(self, tracepoint):
        """The Format of 'category:name', or None when this kernel lacks it."""
        if tracepoint in self._cache:
            return self._cache[tracepoint]
        category, name = tracepoint.split(":", 1)
        fmt = None
        if tracepoint not in self.hidden:
            try:
                with open(self._path(category, name)) as f:
                    fmt = parse_format(f.read(), category, name)
            except (FileNotFoundError, NotADirectoryError):
                fmt = None
        self._cache[tracepoint] = fmt
        return fmt

    def kernel_release(self):
        """The release the saved formats came from, when the directory says."""
        try:
            with open(os.path.join(self.root, "KERNEL_RELEASE")) as f:
                return f.read().strip()
        except OSError:
            return os.uname().release


def hidden_from_env():
    """Tracepoints named in TCPTRACE_HIDE_TRACEPOINTS (comma separated) are
    treated as absent: how tests show a kernel that lacks one."""
    value = os.environ.get("TCPTRACE_HIDE_TRACEPOINTS", "")
    return tuple(t.strip() for t in value.split(",") if t.strip())


def mounted(mountinfo="/proc/self/mountinfo"):
    """The mount points of tracefs, as the kernel lists them: readable by
    anyone, unlike the mount itself (mode 0700 on recent kernels)."""
    points = []
    try:
        with open(mountinfo) as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                if sep and right.split(" ", 1)[0] == "tracefs":
                    points.append(left.split(" ")[4].replace("\\040", " "))
    except OSError:
        pass
    return points


def find_mount():
    """The first tracefs mount that has an events directory, or None. The
    check is a stat() through the mount: it succeeds with the capability
    to search it (CAP_DAC_READ_SEARCH) where os.access() would say no."""
    for root in TRACEFS_MOUNTS + tuple(p for p in mounted() if p not in TRACEFS_MOUNTS):
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


def ensure_mounted():
    """Mount tracefs when it is not mounted and we may; return the mount or None."""
    root = find_mount()
    if root:
        return root
    target = TRACEFS_MOUNTS[0]
    if not mounted() and os.path.isdir(target):
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.mount(b"nodev", target.encode(), b"tracefs", 0, None) == 0:
            return find_mount()
    return None
