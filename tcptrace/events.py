"""The JSON Schema of tcptrace's JSON Lines output, generated from the tools'
columns so that it cannot drift from what they write.

Every object starts with an envelope (output.ENVELOPE): `ts` (wall clock,
RFC 3339 UTC, microseconds), `ts_mono` (seconds of the kernel's monotonic
clock, the event's own timestamp), `host`, `tool` (the subcommand) and
`schema` (this schema's version). Then come the tool's keys: an event's
columns, or under -c a count row's columns and `count`. The schema ships as
tcptrace/schema/events-v1.json; a test holds that file to this generator:

    python -m tcptrace.events > tcptrace/schema/events-v1.json

Version 1 may gain keys and tools (a consumer should ignore what it does not
know; the schema is strict so that tcptrace's own tests notice); a key that
changes meaning or goes away means version 2, a new file and a new `schema`.
"""

import json
import sys
from importlib import resources

from .output import ENVELOPE, SCHEMA_VERSION, TIME_COLUMN, TIMESTAMP_COLUMN
from .tools import TOOLS

SCHEMA_FILE = f"events-v{SCHEMA_VERSION}.json"
SCHEMA_ID = f"urn:tcptrace:schema:events:v{SCHEMA_VERSION}"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

RFC3339_MICRO = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$"


def _envelope(tools):
    return {
        "ts": {"type": "string", "format": "date-time", "pattern": RFC3339_MICRO,
               "description": "wall-clock time of the event, UTC, microseconds (ts_mono plus the offset "
                              "between the clocks taken when the run started)"},
        "ts_mono": {"type": "number", "minimum": 0,
                    "description": "the event's kernel timestamp: seconds of CLOCK_MONOTONIC (since boot, "
                                   "without suspend), nanosecond digits; a count row has the time it was printed"},
        "host": {"type": "string", "minLength": 1, "description": "the host name of the machine traced"},
        "tool": {"enum": sorted(tools), "description": "the subcommand that wrote the object"},
        "schema": {"const": SCHEMA_VERSION, "description": "the version of this schema"},
    }


def column_schema(col):
    kind = col.json_type
    out = {"type": [kind, "null"] if col.nullable else kind, "description": col.header}
    if col.extended:
        out["description"] += " (only with -x/--extended)"
    return out


def _record(name, columns, required_extra=(), optional=()):
    props = {key: {"$ref": f"#/properties/{key}"} for key in ENVELOPE}
    props["tool"] = {"const": name}
    required = list(ENVELOPE)
    for col in optional:
        props[col.key] = column_schema(col)
    for col in columns:
        if not col.json:
            continue
        props[col.key] = column_schema(col)
        if not col.extended:
            required.append(col.key)
    required += list(required_extra)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def record_names(specs=None):
    """The $defs names: one per tool, and `<tool>.count` for tools with -c."""
    specs = list(specs if specs is not None else TOOLS.values())
    names = [s.name for s in specs]
    names += [f"{s.name}.count" for s in specs if s.counter]
    names += [f"{s.name}.hist" for s in specs if s.counter and s.counter.histogram]
    return names


def _hist_record(spec):
    """One histogram of `tcptrace <tool> --hist ... -o json`."""
    from .spec import Column

    hist = spec.counter.histogram
    rec = _record(spec.name, (Column("hist", "the value counted"), Column("count", "COUNT", type="integer")),
                  optional=hist.labels)
    rec["properties"]["buckets"] = {
        "type": "array", "description": "[low, high, count]: values from low to high, inclusive",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 3, "maxItems": 3},
    }
    rec["required"].append("buckets")
    rec["description"] = f"one histogram of `tcptrace {spec.name} --hist ... -o json`, counted in the kernel"
    return rec


def events_schema(specs=None):
    """The schema as a dict (deterministic: the file is compared to it)."""
    from .spec import Column

    specs = list(specs if specs is not None else TOOLS.values())
    count = Column("count", "COUNT", 8, "d")
    defs = {}
    for spec in specs:
        # -T and -t add `time` (HH:MM:SS, local) and `timestamp` (seconds since the first event).
        defs[spec.name] = _record(spec.name, spec.columns, optional=(TIME_COLUMN, TIMESTAMP_COLUMN))
        defs[spec.name]["description"] = f"one event of `tcptrace {spec.name} -o json`: {spec.summary}"
    for spec in specs:
        if spec.counter:
            rec = _record(spec.name, tuple(spec.counter.columns) + (count,))
            rec["description"] = f"one row of `tcptrace {spec.name} -c -o json`: in-kernel counts"
            defs[f"{spec.name}.count"] = rec
        if spec.counter and spec.counter.histogram:
            defs[f"{spec.name}.hist"] = _hist_record(spec)
    return {
        "$schema": DRAFT,
        "$id": SCHEMA_ID,
        "title": "tcptrace JSON Lines events",
        "description": (
            f"One JSON object per line, from any `tcptrace <subcommand> -o json`. Version {SCHEMA_VERSION}: "
            "keys and tools may be added within a version; a key that changes meaning or goes away "
            "makes a new version."
        ),
        "type": "object",
        "properties": _envelope([s.name for s in specs]),
        "required": list(ENVELOPE),
        "oneOf": [{"$ref": f"#/$defs/{name}"} for name in record_names(specs)],
        "$defs": defs,
    }


def render(schema=None):
    return json.dumps(schema if schema is not None else events_schema(), indent=2) + "\n"


def shipped():
    """The schema file shipped with the package, as text."""
    return resources.files("tcptrace").joinpath("schema", SCHEMA_FILE).read_text()


if __name__ == "__main__":
    sys.stdout.write(render())
