"""Fake events for the unit tests: a tool's event packed from the fields a
test names, every other field zero, and unpacked again, so decode() gets
what it gets from the kernel (the values tuple of spec.event)."""

from tcptrace.layout import SCALARS, Layout


def pack(layout, **fields):
    """The bytes of `layout` with `fields` set and the rest zero.

    A name the layout lacks, or bytes longer than their array, raise:
    struct would drop the excess in silence and a test would check
    something other than what it says."""
    unknown = set(fields) - set(layout.names)
    if unknown:
        raise TypeError(f"no field {', '.join(sorted(unknown))} in {layout.names}")
    values = []
    for name, ftype in layout.fields:
        size = _array_size(ftype)
        value = fields.get(name, bytes(size) if size else 0)
        if size:
            if isinstance(value, str):
                value = value.encode()
            if len(value) > size:
                raise ValueError(f"{name}: {len(value)} bytes do not fit in {ftype}")
        values.append(value)
    return layout.struct.pack(*values)


def make_event(spec, **fields):
    """The values tuple decode() takes, for a tool's spec (or a bare Layout:
    a count key, say)."""
    layout = spec if isinstance(spec, Layout) else spec.event
    return layout.struct.unpack(pack(layout, **fields))


def _array_size(ftype):
    """Bytes of an array field (Layout packs every array as bytes), 0 for a scalar."""
    if "[" not in ftype:
        return 0
    base, count = ftype[:-1].split("[")
    element = 1 if base == "char" else SCALARS[base][0]
    return element * int(count)
