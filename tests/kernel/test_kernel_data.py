"""doctor's verdict from saved format files, held against the report of the
real kernel they came from (no root needed).

tests/data/doctor/<kernel>.json is `tcptrace doctor -o json` run on that
kernel: 6.1 and 6.12 inside the guests of `make test-kernel` (each leaves its
report in build/test-kernel/<version>/doctor.json), 6.18 on the project's
CI VM. Where the saved set has the kernel's BTF facts (btf.json), the
columns that read kernel structs are judged from them, as the real report
judged them from the kernel's BTF. Commands and
tracepoints that only one side knows (a tool added since the report was
made) are left out, so a new tool does not need a new report at once; a
command the report has and the code lacks is a failure.
"""

import importlib.util
import json
import os

import pytest
from click.testing import CliRunner

from tcptrace import headers
from tcptrace.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")
def _gendocs():
    spec = importlib.util.spec_from_file_location("gendocs", os.path.join(ROOT, "scripts", "gendocs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gendocs = _gendocs()
REPORTS = sorted(name[: -len(".json")] for name in os.listdir(os.path.join(DATA, "doctor")) if name.endswith(".json"))


def real_report(kernel):
    with open(os.path.join(DATA, "doctor", kernel + ".json")) as f:
        return json.load(f)


def saved_report(kernel):
    result = CliRunner().invoke(cli, ["doctor", "--formats", os.path.join(DATA, "formats", kernel), "-o", "json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return json.loads(result.output)


def test_reports_exist():
    assert {"6.1", "6.12", "6.18"} <= set(REPORTS)


@pytest.mark.parametrize("kernel", REPORTS)
def test_report_is_of_that_kernel(kernel):
    real = real_report(kernel)
    assert real["source"] == "running kernel"
    assert ".".join(map(str, headers.version_triple(real["release"])[:2])) == kernel
    assert real["status"] == 0, "every subcommand could run on the real kernel"


@pytest.mark.parametrize("kernel", REPORTS)
def test_saved_formats_judged_as_the_real_kernel(kernel):
    real, saved = real_report(kernel), saved_report(kernel)
    real_commands = {c["name"]: c["status"] for c in real["commands"]}
    saved_commands = {c["name"]: c["status"] for c in saved["commands"]}
    # A command the real kernel's report has and the code lacks went missing.
    assert real_commands.keys() <= saved_commands.keys()
    both = real_commands.keys()
    assert {n: saved_commands[n] for n in both} == {n: real_commands[n] for n in both}
    real_tps = {t["name"]: (t["present"], t["fields"]) for t in real["tracepoints"]}
    saved_tps = {t["name"]: (t["present"], t["fields"]) for t in saved["tracepoints"]}
    both = real_tps.keys() & saved_tps.keys()
    assert both
    assert {n: saved_tps[n] for n in both} == {n: real_tps[n] for n in both}


@pytest.mark.parametrize("kernel", [k for k in REPORTS if os.path.exists(os.path.join(DATA, "formats", k, "btf.json"))])
def test_btf_facts_judge_columns_as_the_real_kernel(kernel):
    """Every column of every command the real report has: available or
    not, the same from the saved formats and BTF facts (what docs/kernels.md
    shows) as on the kernel itself."""
    real = {c["name"]: c for c in real_report(kernel)["commands"]}
    saved = {c.name: c for c in gendocs.judge_saved(os.path.join(DATA, "formats", kernel))}
    assert real.keys() <= saved.keys()
    for name, command in real.items():
        assert saved[name].status == command["status"], name
        real_columns = {c["key"]: c["available"] for c in command["columns"]}
        saved_columns = {c.key: c.available for c in saved[name].columns}
        both = real_columns.keys() & saved_columns.keys()
        assert {k: saved_columns[k] for k in both} == {k: real_columns[k] for k in both}, name
        assert None not in saved_columns.values(), name
