#!/usr/bin/env python3
"""Rewrite the generated sections of docs/ from the code (`make docs`).

A generated section sits between `<!-- generated: NAME -->` and
`<!-- end: NAME -->`; everything outside the markers is written by hand and
kept as it is. What is generated comes from declarations the code already
holds, so the pages cannot drift from it (tests/test_docs.py compares them):

  docs/json.md      json      the keys of every JSON Lines object, from the
                              shipped schema (tcptrace/schema/events-v1.json)
  docs/exporter.md  metrics   the exporter's metric table (exporter.METRICS)
  docs/kernels.md   kernels   first kernels per tool and column (the specs'
                              Tracepoint.since and Column.requires), and the
                              verdict of `tcptrace doctor` on the saved
                              formats of the kernels the tests cover

    python scripts/gendocs.py            rewrite every generated section
    python scripts/gendocs.py --check    exit 1 if any section is stale
    python scripts/gendocs.py --section NAME --from FILE PAGE
                                         put FILE into PAGE's section NAME
                                         (`make reliability`, the bench)

Needs neither root nor bcc.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
SAVED_FORMATS = ROOT / "tests" / "data" / "formats"


class MarkerError(ValueError):
    pass


def _markers(name):
    return f"<!-- generated: {name} -->", f"<!-- end: {name} -->"


def read_section(text, name):
    """The body between NAME's markers (without the newlines that frame it)."""
    start, end = _markers(name)
    pattern = re.compile(re.escape(start) + r"\n?(.*?)\n?" + re.escape(end), re.S)
    found = pattern.findall(text)
    if len(found) != 1:
        raise MarkerError(f"expected one '{start}' ... '{end}' pair, found {len(found)}")
    return found[0]


def replace_section(text, name, body):
    """TEXT with the body of NAME's section replaced; the rest untouched."""
    read_section(text, name)  # exactly one pair, or an error naming it
    start, end = _markers(name)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    return pattern.sub(lambda _m: block, text, count=1)


def sections(name_filter=None):
    """{(page, name): body} for every section this script owns."""
    makers = {
        ("json.md", "json"): json_section,
        ("exporter.md", "metrics"): metrics_section,
        ("kernels.md", "kernels"): kernels_section,
    }
    return {key: make() for key, make in makers.items() if name_filter in (None, key[1])}


# -- docs/json.md -------------------------------------------------------------------


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _json_type(prop):
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    kind = prop.get("type", "")
    return " or ".join(kind) if isinstance(kind, list) else kind


def json_section(schema=None):
    from tcptrace import events

    schema = schema if schema is not None else json.loads(events.shipped())
    envelope = schema["properties"]
    lines = ["### Every object", "", "| key | type | meaning |", "|---|---|---|"]
    for key, prop in envelope.items():
        lines.append(f"| `{key}` | {_json_type(prop)} | {_cell(prop.get('description', ''))} |")
    for name, record in schema["$defs"].items():
        required = set(record.get("required", ()))
        lines += ["", f"### {name}", "", _cell(record.get("description", "")), "",
                  "| key | type | column | always |", "|---|---|---|---|"]
        for key, prop in record["properties"].items():
            if key in envelope:
                continue
            lines.append(f"| `{key}` | {_json_type(prop)} | {_cell(prop.get('description', ''))} | "
                         f"{'yes' if key in required else 'no'} |")
    return "\n".join(lines)


# -- docs/exporter.md ---------------------------------------------------------------


def metrics_section():
    from tcptrace import exporter

    return exporter.markdown_table()


# -- docs/kernels.md ----------------------------------------------------------------


def specs():
    """Every program tcptrace loads: the event tools and the exporter."""
    from tcptrace import exporter
    from tcptrace.tools import TOOLS

    out = list(TOOLS.values())
    if exporter.SPEC.name not in TOOLS:
        out.append(exporter.SPEC)
    return out


def _version_key(text):
    return tuple(int(p) for p in re.findall(r"\d+", text)) or (0,)


def _tracepoint_since(all_specs):
    """tracepoint -> the latest `since` any tool declares for it (tools ask
    for different fields, and a field can be younger than its tracepoint)."""
    since = {}
    for spec in all_specs:
        for tp in spec.tracepoints:
            if tp.since and _version_key(tp.since) > _version_key(since.get(tp.name, "0")):
                since[tp.name] = tp.since
    return since


def _saved_kernels():
    if not SAVED_FORMATS.is_dir():
        return []
    dirs = [d for d in SAVED_FORMATS.iterdir() if d.is_dir()]
    return sorted(dirs, key=lambda d: _version_key(d.name))


def kernels_section():
    from tcptrace import doctor

    all_specs = specs()
    since = _tracepoint_since(all_specs)
    lines = ["### First kernel per subcommand", "",
             "| subcommand | needs | from Linux | uses when present |", "|---|---|---|---|"]
    for spec in all_specs:
        required = [tp for tp in spec.tracepoints if not tp.optional]
        optional = [tp for tp in spec.tracepoints if tp.optional]
        first = max((tp.since for tp in required if tp.since), key=_version_key, default="-")
        needs = ", ".join(f"`{tp.name}`" for tp in required) or "-"
        uses = ", ".join(f"`{tp.name}` ({tp.since or '?'})" for tp in optional) or "-"
        lines.append(f"| {spec.name} | {needs} | {first} | {uses} |")

    lines += ["", "### Columns that need more than their subcommand", "",
              "| subcommand | column | needs |", "|---|---|---|"]
    for spec in all_specs:
        for col in spec.columns:
            if not col.requires:
                continue
            needs, members = [], []
            for req in col.requires:
                if ":" in req:
                    tp, _, fld = req.partition(".")
                    what = f"field `{fld}` of `{tp}`" if fld else f"`{tp}`"
                    if not fld and tp in since:
                        what += f" (Linux {since[tp]})"
                    needs.append(what)
                else:
                    members.append(f"`{req}`")
            if members:
                needs.append(", ".join(members) + " in the kernel's BTF")
            lines.append(f"| {spec.name} | {col.header} (`{col.key}`) | {'; '.join(needs)} |")

    kernels = _saved_kernels()
    if kernels:
        verdicts = {}
        unknown = set()
        for d in kernels:
            report = doctor.diagnose(str(d), specs=all_specs)
            for cmd in report.commands:
                blank = [c.header for c in cmd.columns if c.available is False]
                unknown.update(f"{cmd.name} {c.header}" for c in cmd.columns if c.available is None)
                cell = cmd.status + (": no " + ", ".join(blank) if blank else "")
                verdicts.setdefault(cmd.name, {})[d.name] = cell
        lines += ["", "### `tcptrace doctor` on the saved formats of each tested kernel", "",
                  "| subcommand | " + " | ".join(d.name for d in kernels) + " |",
                  "|---|" + "---|" * len(kernels)]
        for spec in all_specs:
            row = verdicts.get(spec.name, {})
            lines.append(f"| {spec.name} | " + " | ".join(row.get(d.name, "-") for d in kernels) + " |")
        if unknown:
            lines += ["", "Saved formats carry no BTF, so these columns are judged only on a running kernel: "
                      + ", ".join(sorted(unknown)) + "."]
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------


def stale(generated=None):
    """[(page, name)] whose section differs from what this script writes."""
    generated = generated if generated is not None else sections()
    out = []
    for (page, name), body in generated.items():
        path = DOCS / page
        text = path.read_text() if path.exists() else ""
        try:
            if read_section(text, name) != body.strip("\n"):
                out.append((page, name))
        except MarkerError:
            out.append((page, name))
    return out


def write_section(path, name, body):
    path = Path(path)
    text = path.read_text()
    new = replace_section(text, name, body)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rewrite the generated sections of docs/.")
    parser.add_argument("--check", action="store_true", help="only report stale sections (exit 1 if any)")
    parser.add_argument("--section", metavar="NAME", help="the one section to write (with --from)")
    parser.add_argument("--from", dest="source", metavar="FILE", help="the section's new body")
    parser.add_argument("page", nargs="?", help="the page holding --section")
    args = parser.parse_args(argv)
    if args.source or args.page:
        if not (args.section and args.source and args.page):
            parser.error("--section NAME --from FILE PAGE go together")
        body = Path(args.source).read_text()
        try:
            changed = write_section(args.page, args.section, body)
        except MarkerError as e:
            parser.error(f"{args.page}: {e}")
        print(f"{args.page}: section {args.section} {'rewritten' if changed else 'unchanged'}")
        return 0
    generated = sections(args.section)
    if args.check:
        old = stale(generated)
        for page, name in old:
            print(f"docs/{page}: section {name} is stale: run make docs", file=sys.stderr)
        return 1 if old else 0
    for (page, name), body in generated.items():
        try:
            changed = write_section(DOCS / page, name, body)
        except (MarkerError, FileNotFoundError) as e:
            print(f"docs/{page}: {e}", file=sys.stderr)
            return 1
        print(f"docs/{page}: section {name} {'rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
