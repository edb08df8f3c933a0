"""C struct layouts shared by the kernel side and the user side.

A tool declares its event once in Python as a list of (name, type) pairs;
its .bpf.c declares the same struct in plain C. `parse_c_struct` reads the C
one back so a test can hold both to the same fields, types and offsets, and
`Layout` gives the precompiled struct.Struct that decodes samples.
"""

import re
import struct

# type name -> (size, struct code); arrays are written "u8[16]" / "char[16]".
SCALARS = {
    "u8": (1, "B"),
    "u16": (2, "H"),
    "u32": (4, "I"),
    "u64": (8, "Q"),
    "s8": (1, "b"),
    "s16": (2, "h"),
    "s32": (4, "i"),
    "s64": (8, "q"),
}
_ALIASES = {
    "__u8": "u8", "__u16": "u16", "__u32": "u32", "__u64": "u64",
    "__s8": "s8", "__s16": "s16", "__s32": "s32", "__s64": "s64",
    "unsigned char": "u8", "unsigned short": "u16", "unsigned int": "u32",
    "unsigned long long": "u64", "int": "s32", "long long": "s64",
    "short": "s16", "char": "char",
}


def _split(ftype):
    m = re.match(r"^(\w+)(?:\[(\d+)\])?$", ftype)
    if not m:
        raise ValueError(f"unsupported field type {ftype!r}")
    return m.group(1), int(m.group(2) or 0)


def normalize(ctype, count=0):
    base = _ALIASES.get(ctype.strip(), ctype.strip())
    if base not in SCALARS and base != "char":
        raise ValueError(f"unsupported C type {ctype!r}")
    return f"{base}[{count}]" if count else base


class Layout:
    """Offsets, size and a precompiled decoder for a struct with C's natural
    alignment (what clang gives the BPF target for these types)."""

    def __init__(self, fields):
        self.fields = list(fields)
        self.offsets = {}
        code = "<"
        offset = 0
        max_align = 1
        for name, ftype in self.fields:
            base, count = _split(ftype)
            if base == "char":
                size, align, piece = 1, 1, None
            else:
                size, piece = SCALARS[base]
                align = size
            pad = -offset % align
            code += "x" * pad
            offset += pad
            self.offsets[name] = offset
            if count:
                code += f"{size * count}s"
                offset += size * count
            else:
                code += piece
                offset += size
            max_align = max(max_align, align)
        tail = -offset % max_align
        code += "x" * tail
        self.size = offset + tail
        self.struct = struct.Struct(code)
        assert self.struct.size == self.size
        self.names = tuple(name for name, _ in self.fields)

    def describe(self):
        """(name, type, offset) for each field: what the sync test compares."""
        return [(name, ftype, self.offsets[name]) for name, ftype in self.fields]


_STRUCT_RE = r"struct\s+{name}\s*\{{(?P<body>.*?)\}}\s*;"
_MEMBER_RE = re.compile(r"^\s*(?P<type>[A-Za-z_][\w ]*?)\s+(?P<name>\w+)\s*(?:\[(?P<n>\w+)\])?\s*;")


def parse_c_struct(source, name, defines=None):
    """The fields of `struct name { ... };` in C source, as Layout pairs.

    Only the plain style the .bpf.c files use is understood: one scalar or
    fixed array member per line. Array sizes may name a #define.
    """
    defines = dict(defines or {})
    for m in re.finditer(r"^#define\s+(\w+)\s+(\d+)\s*$", source, re.M):
        defines.setdefault(m.group(1), int(m.group(2)))
    m = re.search(_STRUCT_RE.format(name=re.escape(name)), source, re.S)
    if not m:
        raise ValueError(f"struct {name} not found")
    body = re.sub(r"/\*.*?\*/", "", m.group("body"), flags=re.S)
    body = re.sub(r"//[^\n]*", "", body)
    fields = []
    for line in body.splitlines():
        if not line.strip():
            continue
        mm = _MEMBER_RE.match(line)
        if not mm:
            raise ValueError(f"cannot parse member line {line.strip()!r} of struct {name}")
        n = mm.group("n")
        count = 0
        if n:
            count = int(n) if n.isdigit() else defines[n]
        fields.append((mm.group("name"), normalize(mm.group("type"), count)))
    return fields
