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
                              Tracepoint.since and Column.requires), the
                              verdict of `tcptrace doctor` on the saved
                              formats of the kernels the tests cover (with
                              each real kernel's BTF facts, btf.json), and
                              where those facts put the members read

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


def btf_facts(kernel_dir):
    """{struct: {member: [offset, size]}}: the BTF of the kernel a saved set
    was read from (btf.json beside its formats), or None for a set derived
    from sources."""
    path = Path(kernel_dir) / "btf.json"
    return json.loads(path.read_text()) if path.exists() else None


def judge_saved(kernel_dir, all_specs=None):
    """[doctor.CommandReport] for a saved set, as `tcptrace doctor` judges a
    running kernel: BTF-fed columns from the set's BTF facts where it has
    them (for every struct the tool reads), not judged where it has none."""
    from tcptrace import doctor, runtime

    all_specs = all_specs if all_specs is not None else specs()
    source = runtime.formats_source(str(kernel_dir))
    facts = btf_facts(kernel_dir)

    def offsets(struct_name, members):
        have = facts[struct_name]
        return {m: tuple(have[m]) for m in members if m in have}

    out = []
    for spec in all_specs:
        known = facts is not None and all(s in facts for s in doctor.btf_wanted(spec))
        out.append(doctor.judge(spec, source, offsets if known else None, btf_known=known))
    return out


def kernels_section():
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
            for cmd in judge_saved(d, all_specs):
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
            lines += ["", "Sets derived from sources carry no BTF, so on those kernels these columns are not "
                      "judged: " + ", ".join(sorted(unknown)) + "."]
        lines += btf_table(kernels, all_specs)
    return "\n".join(lines)


def btf_table(kernels, all_specs):
    """Where each struct member the programs read sits, per kernel whose set
    was read from a running kernel (its btf.json)."""
    from tcptrace import doctor

    real = [(d, btf_facts(d)) for d in kernels if btf_facts(d) is not None]
    if not real:
        return []
    wanted = {}
    for spec in all_specs:
        for struct_name, members in doctor.btf_wanted(spec).items():
            for member in members:
                wanted.setdefault(f"{struct_name}.{member}", []).append(spec.name)
    lines = ["", "### Struct members read, from each kernel's BTF", "",
             "Byte offset (size) in the BTF of each kernel whose formats were read from it running; `-` where "
             "that kernel has no such member: a program then reads the other member named beside it, or "
             "leaves its column blank. A `btf_trace_<event>` row is an argument of that tracepoint as a raw "
             "tracepoint program gets it (its offset in the program's context, 8 bytes each in the order of "
             "the tracepoint's prototype), found where the kernel's prototype has the types the program "
             "expects; without it the program reads the tracepoint's record instead.", "",
             "| member | read by | " + " | ".join(d.name for d, _ in real) + " |",
             "|---|---|" + "---|" * len(real)]
    for key in sorted(wanted):
        struct_name, member = key.split(".", 1)
        cells = []
        for _d, facts in real:
            where = facts.get(struct_name, {}).get(member)
            cells.append(f"{where[0]} ({where[1]})" if where else "-")
        users = ", ".join(dict.fromkeys(wanted[key]))
        lines.append(f"| `{key}` | {users} | " + " | ".join(cells) + " |")
    return lines


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
    if not args.check and not args.section:
        from tcptrace import events

        # The schema is generated from the tools' declarations too: a new
        # tool or key reaches it, and json.md, with the same command.
        schema = ROOT / "tcptrace" / "schema" / events.SCHEMA_FILE
        text = events.render()
        if schema.read_text() != text:
            schema.write_text(text)
            print(f"tcptrace/schema/{events.SCHEMA_FILE}: rewritten")
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
