"""The bench's report code, from saved results: the summary of every tool
against its best anchor, the tables of the probe, top and drops loads, and
the one write of docs/performance.md. Needs neither root nor bcc, and runs
no load.
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench_run", ROOT / "bench" / "run.py")
gendocs = _load("gendocs", ROOT / "scripts" / "gendocs.py")

MACHINE = {"nproc": 2, "mem_mib": 1024, "cpu": "cpu", "kernel": "6.18"}
VERSIONS = {"tcptrace": "abc", "python3-bpfcc": "0.26", "bpftrace": "0.17"}


def load_rec(bench_name, tracers, missing=(), columns=()):
    """A load script's record, as written by --json."""
    return bench.add_stats({"bench": bench_name, "title": f"{bench_name} load", "date": "2026-01-01 00:00:00",
                            "machine": MACHINE, "versions": VERSIONS, "settings": {"rounds": 3}, "unit": "conn/s",
                            "scale": 1.0, "fmt": ",.0f", "columns": list(columns), "tracers": tracers,
                            "missing_anchors": list(missing)})


def rounds(*values, **extra):
    return [{"value": v, **{k: x[i] for k, x in extra.items()}} for i, v in enumerate(values)]


def tracer(label, role, *values, **extra):
    return {"label": label, "role": role, "rounds": rounds(*values, **extra)}


def rep(cpu_rows):
    """One repetition of run.py: [(cpu_s, rows)] per load."""
    return {"loads": [{"key": f"k{i}", "cpu_s": c, "rows": r} for i, (c, r) in enumerate(cpu_rows)]}


def state_run(tracers, results, quick=False, notes=()):
    """A saved run.py run."""
    return {"info": {"date": "2026-01-01 00:00:00", "machine": MACHINE, "versions": VERSIONS,
                     "settings": {"reps": 2, "loads": ["max/2"], "paced_s": 1.5, "max_s": 2.0, "quick": quick},
                     "notes": list(notes), "elapsed_s": 10},
            "loads": [{"key": "max/2", "rate": "max", "pairs": 2, "seconds": 2.0, "connections": 100}],
            "results": results,
            "tracers": {name: {"label": label, "kind": kind, "argv": None if name == "none" else ["x"],
                               "needs_headers": False, "lost_style": style}
                        for name, (label, kind, style) in tracers.items()}}


STATE_TRACERS = {
    "none": ("no tracer", None, "generic"),
    "tcptrace-states": ("tcptrace states", "states", "tcptrace"),
    "tcptrace-life": ("tcptrace life", "life", "tcptrace"),
    "tcptrace-connect": ("tcptrace connect", "connect", "tcptrace"),
    "bcc-tcpstates": ("bcc tcpstates", "states", "generic"),
    "bcc-tcplife": ("bcc tcplife", "life", "generic"),
    "bpftrace": ("bpftrace one-liner", "states", "generic"),
}
# CPU per row (us) per repetition: states 2 and 3; tcpstates 10 and 10;
# bpftrace 8 and 6 (the cheaper anchor); life 4 and 4 against tcplife 16 and 20.
STATE_RESULTS = {
    "none": [rep([]), rep([])],
    "tcptrace-states": [rep([(0.001, 500)]), rep([(0.0015, 500)])],
    "tcptrace-life": [rep([(0.0002, 50)]), rep([(0.0002, 50)])],
    "tcptrace-connect": [rep([(0.0001, 50)]), rep([(0.0001, 50)])],
    "bcc-tcpstates": [rep([(0.005, 500)]), rep([(0.005, 500)])],
    "bcc-tcplife": [rep([(0.0008, 50)]), rep([(0.001, 50)])],
    "bpftrace": [rep([(0.004, 500)]), rep([(0.003, 500)])],
}


# -- medians and spreads ---------------------------------------------------------------


@pytest.mark.parametrize("values, expected, text", [
    ([3, 1, 2], {"median": 2, "min": 1, "max": 3, "n": 3}, "2 (1-3)"),
    ([1, None, 4], {"median": 2.5, "min": 1, "max": 4, "n": 2}, "2.5 (1-4)"),
    ([7], {"median": 7, "min": 7, "max": 7, "n": 1}, "7"),
    ([None], None, "-"),
    ([], None, "-"),
])
def test_three_and_its_text(values, expected, text):
    assert bench.three(values) == expected
    assert bench.fmt_three(bench.three(values), lambda x: f"{x:g}") == text


def test_a_record_carries_its_medians_and_ratios():
    rec = load_rec("drops", [tracer("no tracer", "baseline", 100, 200, 300),
                             tracer("tcptrace drops", "tcptrace", 50, 200, 150, lost=[1, 2, 3])],
                   columns=[{"key": "lost", "label": "lost", "fmt": "d", "agg": "sum"}])
    stats = rec["tracers"][1]["stats"]
    assert stats["value"] == {"median": 150, "min": 50, "max": 200, "n": 3}
    assert stats["ratio_to_none"] == {"median": 0.5, "min": 0.5, "max": 1.0, "n": 3}
    assert stats["slowdown"] == {"median": 2.0, "min": 1.0, "max": 2.0, "n": 3}
    assert stats["lost"]["median"] == 2
    json.dumps(rec)  # what --json writes


# -- the summary: each tool against its best anchor ------------------------------------------


def test_state_tools_meet_the_cheapest_anchor_of_their_kind():
    rows = {r["tool"]: r for r in bench.state_summary(state_run(STATE_TRACERS, STATE_RESULTS))}
    assert list(rows) == ["tcptrace states", "tcptrace life", "tcptrace connect"]
    states = rows["tcptrace states"]
    assert states["metric"] == "tracer CPU per row"
    assert states["measured"] == pytest.approx({"median": 2.5, "min": 2.0, "max": 3.0, "n": 2})
    assert states["anchor"] == "bpftrace one-liner"  # 7 us beats bcc tcpstates' 10
    assert states["anchor_value"] == pytest.approx({"median": 7.0, "min": 6.0, "max": 8.0, "n": 2})
    # ratios within each repetition: 2/8 and 3/6
    assert states["ratio"] == pytest.approx({"median": 0.375, "min": 0.25, "max": 0.5, "n": 2})
    life = rows["tcptrace life"]
    assert life["anchor"] == "bcc tcplife"  # the only tracer of lifespans: not the states one-liner
    assert life["ratio"] == pytest.approx({"median": 0.225, "min": 0.2, "max": 0.25, "n": 2})
    assert rows["tcptrace connect"]["anchor"] == "bcc tcpstates"  # no other connect tracer: its bcc yardstick


def test_state_tools_without_anchors_say_so():
    tracers = {k: v for k, v in STATE_TRACERS.items() if not k.startswith(("bcc", "bpftrace"))}
    saved = state_run(tracers, {k: STATE_RESULTS[k] for k in tracers},
                      notes=["no Debian kernel headers under /usr/src: stock bcc tools skipped"])
    row = bench.state_summary(saved)[0]
    assert row["anchor"] is None and row["ratio"] is None
    assert row["no_anchor"] == ("no bcc or bpftrace tool ran in this run; "
                                "no Debian kernel headers under /usr/src: stock bcc tools skipped")
    line = bench.summary_table([row])[2]
    assert line.endswith("| none runs here (" + row["no_anchor"] + ") | - | - |")


def test_a_failed_repetition_is_left_out_not_shifted():
    results = dict(STATE_RESULTS, **{"bpftrace": [{"loads": [], "error": "did not attach"}, rep([(0.003, 500)])]})
    row = bench.state_summary(state_run(STATE_TRACERS, results))[0]
    assert row["anchor"] == "bpftrace one-liner"
    assert row["ratio"] == pytest.approx({"median": 0.5, "min": 0.5, "max": 0.5, "n": 1})  # 3/6, rep 2 only


def test_load_tools_meet_the_anchor_that_slows_the_load_least():
    rec = load_rec("probe", [tracer("no tracer", "baseline", 100, 100, 100),
                             tracer("tcptrace probe", "tcptrace", 95, 90, 100),
                             tracer("bpftrace slow", "anchor", 50, 50, 50),
                             tracer("bpftrace hist(srtt)", "anchor", 90, 80, 100)])
    (row,) = bench.load_summary(rec)
    assert row["anchor"] == "bpftrace hist(srtt)"
    assert row["measured"]["median"] == pytest.approx(100 / 95)
    assert row["ratio"] == pytest.approx({"median": 90 / 95, "min": 80 / 90, "max": 1.0, "n": 3})


def test_a_tool_without_anchor_is_held_against_no_tracer():
    why = "bcc tcptop-bpfcc: fails (status 1): needs kprobes, which this kernel lacks"
    rec = load_rec("top", [tracer("no tracer", "baseline", 1000, 1000), tracer("tcptrace top", "tcptrace", 800, 1000)],
                   missing=[why])
    (row,) = bench.load_summary(rec)
    assert row["anchor"] is None and row["no_anchor"] == why
    assert row["ratio"] == pytest.approx({"median": 1.125, "min": 1.0, "max": 1.25, "n": 2})
    line = bench.summary_table([row])[2]
    assert line == (f"| tcptrace top | top load | load slowdown (rate without a tracer / with) | x1.12 (x1.00-x1.25) "
                    f"| none runs here ({why}) | - | 1.12 (1.00-1.25) to no tracer |")


def test_summary_table_rows_and_what_was_not_measured():
    rows = bench.state_summary(state_run(STATE_TRACERS, STATE_RESULTS))
    lines = bench.summary_table(rows[:1], ["retrans", "exporter"])
    assert lines[0].startswith("| tool | load | metric | measured, median (min-max) | best anchor")
    assert lines[2] == ("| tcptrace states | loopback connections (bench/loadgen.py): max/2 | tracer CPU per row | "
                        "2.5 us (2.0 us-3.0 us) | bpftrace one-liner | 7.0 us (6.0 us-8.0 us) | 0.38 (0.25-0.50) |")
    assert lines[-1] == "Not measured by the bench: tcptrace retrans, tcptrace exporter."


# -- a load's own table ------------------------------------------------------------------------


def test_load_table_medians_spreads_and_sums():
    columns = [{"key": "cpu_s", "label": "tracer CPU s", "fmt": ".2f", "agg": "median"},
               {"key": "ns", "label": "ns per probe", "fmt": ".0f", "agg": "spread"},
               {"key": "lost", "label": "lost", "fmt": "d", "agg": "sum"}]
    rec = load_rec("drops", [tracer("no tracer", "baseline", 1000, 2000),
                             tracer("tcptrace drops", "tcptrace", 500, 2000, cpu_s=[0.1, 0.3], ns=[100, 140],
                                    lost=[2, 3])], columns=columns)
    lines = bench.load_table(rec)
    assert lines[0] == ("| tracer | conn/s, median (min-max) | ratio to no tracer, median (min-max) | slowdown | "
                        "tracer CPU s | ns per probe | lost |")
    assert lines[2] == "| no tracer | 1,500 (1,000-2,000) | 1.000 (1.000-1.000) | x1.00 (x1.00-x1.00) | - | - | - |"
    assert lines[3] == ("| tcptrace drops | 1,250 (500-2,000) | 0.750 (0.500-1.000) | x1.50 (x1.00-x2.00) | 0.20 | "
                        "120 (100-140) | 5 |")


# -- the page -------------------------------------------------------------------------------------


def write_run(directory, quick=False, benches=("probe", "top", "drops")):
    directory.mkdir()
    (directory / "2026-01-01_000000.json").write_text(json.dumps(state_run(STATE_TRACERS, STATE_RESULTS, quick)))
    recs = {
        "probe": load_rec("probe", [tracer("no tracer", "baseline", 100), tracer("tcptrace probe", "tcptrace", 99),
                                    tracer("bpftrace hist(srtt)", "anchor", 90)]),
        "top": load_rec("top", [tracer("no tracer", "baseline", 100), tracer("tcptrace top", "tcptrace", 98)],
                        missing=["bcc tcptop-bpfcc: fails"]),
        "drops": load_rec("drops", [tracer("no tracer", "baseline", 100), tracer("tcptrace drops", "tcptrace", 97),
                                    tracer("bpftrace kfree_skb", "anchor", 95)]),
    }
    for name in benches:
        (directory / f"{name}.json").write_text(json.dumps(recs[name]))
    return directory


def page_copy(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text((ROOT / "docs" / "performance.md").read_text())
    return page


def test_the_page_has_both_sections_the_bench_writes():
    text = (ROOT / "docs" / "performance.md").read_text()
    for name in (bench.PERFORMANCE_SECTION, bench.TOOLS_SECTION):
        assert gendocs.read_section(text, name).strip()
    assert text.index("<!-- end: bench -->") < text.index("<!-- generated: bench-tools -->")


def test_page_is_written_from_a_run_directory(tmp_path):
    run = write_run(tmp_path / "run")
    page = page_copy(tmp_path)
    before = page.read_text()
    assert bench.write_page(run, page, registered=["states", "life", "connect", "probe", "top", "drops", "retrans"]) == 0
    text = page.read_text()
    states = gendocs.read_section(text, "bench")
    assert states == bench.docs_section(bench.rerender(run / "2026-01-01_000000.json")).strip("\n")
    tools = gendocs.read_section(text, "bench-tools")
    assert tools.startswith("### Every tool against its best anchor\n")
    for tool, anchor in (("tcptrace states", "bpftrace one-liner"), ("tcptrace probe", "bpftrace hist(srtt)"),
                         ("tcptrace top", "none runs here (bcc tcptop-bpfcc: fails)"),
                         ("tcptrace drops", "bpftrace kfree_skb")):
        assert any(line.startswith(f"| {tool} |") and f"| {anchor} |" in line for line in tools.splitlines()), tool
    assert "Not measured by the bench: tcptrace retrans." in tools
    assert [line for line in tools.splitlines() if line.startswith("#### ")] == [
        "#### probe: probe load", "#### top: top load", "#### drops: drops load"]
    # the hand-written text around the sections is kept
    assert text.split("<!-- generated: bench -->")[0] == before.split("<!-- generated: bench -->")[0]
    assert text.split("<!-- end: bench-tools -->")[1] == before.split("<!-- end: bench-tools -->")[1]
    assert (run / "tools.md").read_text() == bench.render_tools(
        json.loads((run / "2026-01-01_000000.json").read_text()),
        {n: json.loads((run / f"{n}.json").read_text()) for n in ("probe", "top", "drops")},
        ["states", "life", "connect", "probe", "top", "drops", "retrans"], bench.shown_path(run))


def test_a_load_that_did_not_run_is_said_to_be_missing(tmp_path):
    run = write_run(tmp_path / "run", benches=("probe",))
    page = page_copy(tmp_path)
    bench.write_page(run, page, registered=[])
    tools = gendocs.read_section(page.read_text(), "bench-tools")
    assert "#### top\n\nNot run in this run." in tools and "#### drops\n\nNot run in this run." in tools


def test_a_quick_run_leaves_the_page_alone(tmp_path):
    run = write_run(tmp_path / "run", quick=True)
    page = page_copy(tmp_path)
    before = page.read_text()
    assert bench.write_page(run, page, registered=[]) == 0
    assert page.read_text() == before


def test_a_page_without_the_tools_section_is_not_half_written(tmp_path):
    run = write_run(tmp_path / "run")
    page = tmp_path / "performance.md"
    page.write_text("# P\n\n<!-- generated: bench -->\nold\n<!-- end: bench -->\n")
    with pytest.raises(SystemExit, match="bench-tools"):
        bench.write_page(run, page, registered=[])
    assert page.read_text() == "# P\n\n<!-- generated: bench -->\nold\n<!-- end: bench -->\n"


def test_a_directory_without_the_state_change_report_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit):
        bench.write_page(run, page_copy(tmp_path), registered=[])


# -- loads that do not add up -----------------------------------------------------------------


def test_a_load_that_does_not_add_up_names_its_kept_output():
    t = bench.Tracer("tcptrace-life", ["x"], "life", lost_style="tcptrace", label="tcptrace life")
    entry = {"key": "max/8", "rows": 90, "expected": 100, "lost": 4, "raw": "unaccounted-a.txt",
             "raw_err": "unaccounted-tcptrace-life-stderr-b.txt"}
    lines = bench.unaccounted([t], {"tcptrace-life": [{"loads": [entry]}]}, "bench/results/run/2026-01-01_000000-")
    assert lines[4] == ("- tcptrace life, repetition 1, load max/8: 90 rows of 100, 4 reported lost (its rows: "
                        "`bench/results/run/2026-01-01_000000-unaccounted-a.txt`, the tracer's stderr: "
                        "`bench/results/run/2026-01-01_000000-unaccounted-tcptrace-life-stderr-b.txt`)")


def test_the_kept_output_is_the_loads_rows_and_the_whole_stderr(tmp_path):
    out = tmp_path / "tcptrace-states.out"
    out.write_bytes(b"SKADDR C-PID C-COMM LADDR LPORT RADDR RPORT OLDSTATE -> NEWSTATE MS\n"
                    b"ffff1 1 a 127.0.0.1 40000 127.0.0.1 20000 CLOSE -> SYN_SENT 0.0\n"
                    b"ffff2 1 a 127.0.0.1 40001 127.0.0.1 20001 CLOSE -> SYN_SENT 0.0\n"
                    b"garbage\n")
    err = tmp_path / "tcptrace-states.err"
    err.write_bytes(b"Tracing TCP state changes. Ctrl-C to end.\n3 events lost (3 in all)\n")
    portmap = {b"20000": 0, b"20001": 1}
    rows = bench.keep_rows(str(out), portmap, 1, str(tmp_path), "tcptrace-states-max/2")
    kept_err = bench.keep_stderr(str(err), str(tmp_path), "tcptrace-states")
    assert rows.startswith("unaccounted-tcptrace-states-max-2-") and kept_err.startswith("unaccounted-")
    assert (tmp_path / rows).read_bytes().splitlines() == [out.read_bytes().splitlines()[i] for i in (0, 2, 3)]
    assert (tmp_path / kept_err).read_bytes() == err.read_bytes()
