"""Turn a tool's BPF source and the running kernel's tracepoint formats
into the one program bcc compiles.

What is generated is data only: a struct per tracepoint record, laid out
from the format file, HAS_<EVENT>_<FIELD> macros (the field's size) for the
fields this kernel has, and integer #defines for options. The logic stays in
the hand-written .bpf.c, which adapts with #if. User input reaches the
program only as validated integers through `define()`, never as text.
"""

import os
import re

from .errors import BuildError, KernelTooOldError
from .layout import Layout

COMMON_HEADER = "tcptrace.h"
# The programs ship as files inside the package (pyproject.toml's package data).
BPF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpf")
_IDENT = re.compile(r"^[A-Z][A-Z0-9_]*$")
_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include\b(.*)$", re.M)
_OUR_HEADER = re.compile(r'^\s*"(tcptrace\.h|[A-Za-z0-9_]+\.bpf\.h)"\s*$')


def bpf_source(name):
    with open(os.path.join(BPF_DIR, name), encoding="utf-8") as f:
        return f.read()


def expand_includes(text, what, seen=None):
    """`text` with each `#include "tcptrace.h"` or `"<name>.bpf.h"` line
    replaced by that header from the package's bpf/ directory, expanded
    the same way; a header already expanded becomes nothing.

    Headers are pasted rather than found by the compiler (-I): the program
    text alone is the cache key of the compiled program and what --ebpf
    prints, so it has to hold every line that is compiled. No other
    include is allowed: programs are built without kernel headers.
    """
    seen = set() if seen is None else seen

    def paste(match):
        name = _OUR_HEADER.match(match.group(1))
        if not name:
            raise BuildError(f"{what} includes {match.group(1).strip()}: tcptrace programs include only "
                             f"their own headers (\"{COMMON_HEADER}\", \"<name>.bpf.h\")")
        header = name.group(1)
        if header in seen:
            return ""
        seen.add(header)
        try:
            body = bpf_source(header)
        except (FileNotFoundError, OSError):
            raise BuildError(f"{what} includes \"{header}\", which is not among tcptrace's BPF headers; "
                             f"reinstall tcptrace") from None
        return expand_includes(body, header, seen).rstrip("\n")

    return _INCLUDE.sub(paste, text)


def _scalar(size, signed):
    kind = "s" if signed else "u"
    if size not in (1, 2, 4, 8):
        return None
    return f"__{kind}{size * 8}"


def _member(field):
    """(C type, element count, alignment) for one format field; count 0 is a scalar."""
    if field.is_data_loc:
        return "__u32", 0, 4
    if field.is_array:
        count = field.array if field.array > 0 else field.size
        elem = field.size // count if count else 1
        ctype = _scalar(elem, False)
        if ctype is None or elem * count != field.size:
            return "__u8", field.size, 1
        return ctype, count, elem
    if "*" in field.ctype:
        return "__u64", 0, 8
    ctype = _scalar(field.size, field.signed)
    if ctype is None:
        return "__u8", field.size, 1
    return ctype, 0, field.size


def _members(fmt):
    """(name, C type, count) of the generated struct, padding included, so
    that every member sits at the offset the format file gives.

    A member the natural layout cannot place (an odd offset) becomes a byte
    array of its size; programs read such fields with HAS_ sizes in mind.
    """
    out = [("__common", "__u8", 8)]
    offset = 8
    for field in sorted(fmt.fields, key=lambda f: f.offset):
        if field.name.startswith("common_") or field.offset < offset:
            continue  # the common header, or an overlap formats do not have
        ctype, count, align = _member(field)
        if field.offset % align:
            ctype, count = "__u8", field.size
        if field.offset > offset:
            out.append((f"__pad{offset}", "__u8", field.offset - offset))
        out.append((field.name, ctype, count))
        offset = field.offset + field.size
    return out


def tp_struct(fmt):
    lines = [f"struct tp_{fmt.name} {{"]
    for name, ctype, count in _members(fmt):
        lines.append(f"\t{ctype} {name}[{count}];" if count else f"\t{ctype} {name};")
    lines.append("};")
    return "\n".join(lines)


def has_macros(fmt):
    up = fmt.name.upper()
    lines = [f"#define HAVE_{up} 1"]
    for field in fmt.fields:
        if not field.name.startswith("common_"):
            lines.append(f"#define HAS_{up}_{field.name.upper()} {field.size}")
    return "\n".join(lines)


def _field_ok(fmt, entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    return any(fmt.has(n) for n in names)


def resolve(spec, source):
    """The formats a tool will use on this kernel.

    Raises KernelTooOldError naming the tracepoint or field and the kernel
    version that has it. Returns ({tracepoint: Format}, [unavailable optional
    tracepoints with the reason]).
    """
    formats = {}
    missing = []
    for tp in spec.tracepoints:
        fmt = source.load(tp.name)
        since = f" (Linux {tp.since} or later has it)" if tp.since else ""
        if fmt is None:
            if tp.optional:
                missing.append((tp, "tracepoint absent"))
                continue
            raise KernelTooOldError(
                f"tcptrace {spec.name} needs the tracepoint {tp.name}, which this kernel does not have{since}."
            )
        bad = [e for e in tp.fields if not _field_ok(fmt, e)]
        if bad:
            names = " or ".join(bad[0]) if isinstance(bad[0], tuple) else bad[0]
            if tp.optional:
                missing.append((tp, f"field {names} absent"))
                continue
            raise KernelTooOldError(
                f"tcptrace {spec.name} needs field {names} of {tp.name}, which this kernel's format lacks{since}."
            )
        formats[tp.name] = fmt
    return formats, missing


def define(name, value):
    """One #define of an integer option; anything else is refused."""
    if not _IDENT.match(name):
        raise ValueError(f"bad macro name {name!r}")
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int):
        raise TypeError(f"macro {name} must be an integer, got {type(value).__name__}")
    return f"#define {name} {value}"


def program(spec, formats, defines, release=""):
    """The full program text: generated part, shared header, tool source."""
    parts = [
        f"/* tcptrace {spec.name}: generated for Linux {release or 'unknown'} from its tracepoint formats */",
    ]
    parts += [define(k, v) for k, v in sorted(defines.items())]
    for name in sorted(formats):
        fmt = formats[name]
        parts.append(has_macros(fmt))
        parts.append(tp_struct(fmt))
    seen = set()
    parts.append(expand_includes(bpf_source(spec.bpf), spec.bpf, seen))
    if COMMON_HEADER not in seen:
        raise ValueError(f"{spec.bpf} must include \"{COMMON_HEADER}\"")
    return "\n".join(parts) + "\n"


def tp_layout(fmt):
    """The Layout of the generated struct, for tests that check offsets."""
    return Layout([(n, f"{t[2:]}[{c}]" if c else t[2:]) for n, t, c in _members(fmt)])
