"""The README and docs/ say what the code does: every subcommand and option
is documented, and the generated sections (JSON keys, metrics, kernels) are
what scripts/gendocs.py writes from the code now. Needs neither root nor bcc.
"""

import importlib.util
import json
import re
from pathlib import Path

import click
import pytest

from tcptrace import errors, events, exporter
from tcptrace.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gendocs = _load("gendocs", ROOT / "scripts" / "gendocs.py")

COMMANDS = sorted(cli.commands)


def _options(command):
    """Every name of every visible option: ("-L", "--localport"), ..."""
    return [p.opts + p.secondary_opts for p in command.params if isinstance(p, click.Option) and not p.hidden]


def _named(text, opt):
    return re.search(r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])", text) is not None


def undocumented_options(command, text):
    return [opt for names in _options(command) for opt in names if not _named(text, opt)]


def readme_sections(text):
    return set(re.findall(r"^#{2,3} tcptrace (\S+)\s*$", text, re.M))


def table_keys(text, heading_level="###"):
    """{heading: [first-column `key`s of the tables under it]}."""
    out, current = {}, None
    for line in text.splitlines():
        heading = re.match(re.escape(heading_level) + r" (\S.*?)\s*$", line)
        if heading:
            current = heading.group(1)
            out[current] = []
            continue
        row = re.match(r"\| `([^`]+)` \|", line)
        if row and current is not None:
            out[current].append(row.group(1))
    return out


def relative_links(text):
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


# -- every subcommand and option ---------------------------------------------------


def test_there_are_commands_to_check():
    assert {"states", "life", "doctor", "exporter"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_a_readme_section_and_a_page(name):
    assert name in readme_sections(README.read_text()), f"README.md has no '### tcptrace {name}' section"
    assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert f"(docs/{name}.md)" in README.read_text(), f"README.md does not link docs/{name}.md"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_named_on_its_page(name):
    page = DOCS / f"{name}.md"
    if not page.is_file():
        pytest.fail(f"docs/{name}.md is missing")
    missing = undocumented_options(cli.commands[name], page.read_text())
    assert not missing, f"docs/{name}.md does not name {', '.join(missing)}"


def test_an_unnamed_option_is_caught():
    command = cli.commands["life"]
    text = (DOCS / "life.md").read_text()
    assert not undocumented_options(command, text)
    scratch = re.sub(r"(?<![\w-])(-x|--extended)(?![\w-])", "", text)
    assert undocumented_options(command, scratch) == ["-x", "--extended"]


def test_exit_statuses_are_the_codes():
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", README.read_text().split("## Exit status", 1)[1], re.M)
    assert [int(code) for code, _ in rows] == [code for code, _ in errors.EXIT_STATUSES]


# -- generated sections --------------------------------------------------------------


def test_generated_sections_are_current():
    stale = gendocs.stale()
    assert not stale, "stale generated sections (run make docs): " + ", ".join(f"docs/{p} {n}" for p, n in stale)


def test_a_stale_section_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- generated: x -->\nold\n<!-- end: x -->\noutro\n")
    assert gendocs.write_section(page, "x", "new\n")
    assert page.read_text() == "intro\n<!-- generated: x -->\nnew\n<!-- end: x -->\noutro\n"
    assert not gendocs.write_section(page, "x", "new")
    with pytest.raises(gendocs.MarkerError):
        gendocs.write_section(page, "y", "anything")


def test_json_keys_equal_the_schema():
    schema = json.loads(events.shipped())
    documented = table_keys((DOCS / "json.md").read_text())
    assert documented.pop("Every object") == list(schema["properties"])
    expected = {name: [k for k in rec["properties"] if k not in schema["properties"]]
                for name, rec in schema["$defs"].items()}
    assert documented == expected


def test_an_undocumented_json_key_is_caught():
    schema = json.loads(events.shipped())
    schema["$defs"]["life"]["properties"]["new_key"] = {"type": "integer", "description": "NEW"}
    keys = table_keys(gendocs.json_section(schema))
    assert "new_key" in keys["life"]
    assert keys != table_keys((DOCS / "json.md").read_text())


def test_metrics_equal_the_exporter():
    text = (DOCS / "exporter.md").read_text()
    documented = re.findall(r"^\| `(tcptrace_\w+)` \|", text, re.M)
    assert documented == [m.name for m in exporter.METRICS]


# -- links ------------------------------------------------------------------------------


def _pages():
    return [README] + sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files(page):
    broken = []
    for link in relative_links(page.read_text()):
        target = (page.parent / link.split("#", 1)[0]).resolve()
        if not target.exists():
            broken.append(link)
    assert not broken, f"{page.name}: broken links {broken}"


def test_readme_stays_a_front_door():
    assert len(README.read_bytes()) <= 12 * 1024


# -- the pages written by runs -------------------------------------------------------------


def test_bench_report_rewrites_only_its_section(tmp_path):
    bench = _load("bench_run", ROOT / "bench" / "run.py")
    page = tmp_path / "performance.md"
    page.write_text("# Performance\n\nby hand\n\n<!-- generated: bench -->\nold numbers\n<!-- end: bench -->\n\nafter\n")
    report = "# tcptrace benchmark, 2026-01-01\n\n## Summary\n\n| tool | CPU |\n|---|---|\n| states | 4.0 us |\n"
    assert bench.update_docs(report, page)
    text = page.read_text()
    assert text.startswith("# Performance\n\nby hand\n\n<!-- generated: bench -->\n### tcptrace benchmark, 2026-01-01\n")
    assert "#### Summary\n\n| tool | CPU |\n|---|---|\n| states | 4.0 us |\n<!-- end: bench -->\n\nafter\n" in text
    assert "old numbers" not in text


def test_the_pages_written_by_runs_have_their_sections():
    for page, name in (("performance.md", "bench"), ("reliability.md", "reliability")):
        assert gendocs.read_section((DOCS / page).read_text(), name).strip()


def test_reliability_section_comes_from_the_report_file(tmp_path):
    page = tmp_path / "reliability.md"
    page.write_text((DOCS / "reliability.md").read_text())
    report = tmp_path / "report.md"
    report.write_text("### Faults\n\n| tried | result |\n|---|---|\n| a thing | exit 4 |\n")
    assert gendocs.main(["--section", "reliability", "--from", str(report), str(page)]) == 0
    assert gendocs.read_section(page.read_text(), "reliability") == report.read_text().strip("\n")
    assert "## Soak" in page.read_text()
