import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import must_run  # noqa: E402

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")


def _bpf_problem():
    if os.geteuid() != 0:
        return "not root"
    try:
        from tcptrace import runtime

        runtime.find_bcc()
        if runtime.formats_source() is None:
            return "no tracefs"
    except Exception as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def bpf():
    """Root, bcc and tracefs: what the privileged tests need."""
    problem = _bpf_problem()
    if problem:
        if must_run():
            pytest.fail(f"privileged tests must run in CI but cannot: {problem}")
        pytest.skip(f"privileged test: {problem}")
    return True


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "bpf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.privileged)


@pytest.fixture
def formats_dir():
    return FORMATS


# Tests that exercise a failure record what they tried and what tcptrace did;
# with TCPTRACE_REPORT=FILE the run writes them as the README's markdown tables.
_REPORT = []


@pytest.fixture
def report():
    def add(section, tried, result):
        _REPORT.append((section, tried, result))

    return add


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TCPTRACE_REPORT")
    if not path or not _REPORT:
        return
    sections = {}
    for section, tried, result in _REPORT:
        rows = sections.setdefault(section, {})
        rows.setdefault(tried, []).append(result)
    out = []
    for section, rows in sections.items():
        out += [f"### {section}", "", "| tried | result |", "|---|---|"]
        for tried, results in rows.items():
            distinct = sorted(set(results))
            shown = distinct[0] if len(distinct) == 1 else "; ".join(distinct)
            if len(results) > 1 and len(distinct) == 1:
                shown += f" (all {len(results)} subcommands)"
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in (tried, shown)]
            out.append(f"| {cells[0]} | {cells[1]} |")
        out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out))
