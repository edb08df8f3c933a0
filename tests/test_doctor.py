"""tcptrace doctor: its verdicts on saved kernels' formats (no root needed)
and on this machine (privileged: the report of the real kernel, with
tracepoints hidden through the TCPTRACE_HIDE_TRACEPOINTS seam)."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
from click.testing import CliRunner

from tcptrace import doctor, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.errors import (
    EXIT_BUILD_FAILED,
    EXIT_KERNEL_TOO_OLD,
    EXIT_NO_BCC,
    EXIT_NO_TRACEFS,
    EXIT_OK,
    EXIT_PRIVILEGE,
)
from tcptrace.spec import Column, Tracepoint
from tcptrace.programs import PROGRAMS
from tcptrace.tools import TOOLS, states

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = os.path.join(ROOT, "tests", "data", "formats")
KERNELS = ("4.19", "5.4", "5.10", "5.15", "6.1", "6.8", "6.12", "6.18")
HIDE = "TCPTRACE_HIDE_TRACEPOINTS"
RETRANSMIT = "tcp:tcp_retransmit_skb"


def run_saved(kernel, *args, hide=None):
    env = {HIDE: hide} if hide else {}
    result = CliRunner().invoke(cli, ["doctor", "--formats", os.path.join(FORMATS, kernel), "-o", "json", *args],
                                env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output)


def by_name(items):
    return {item["name"]: item for item in items}


def saved_fields(kernel, tracepoint):
    category, name = tracepoint.split(":")
    path = os.path.join(FORMATS, kernel, category, name + ".format")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        fmt = tracefs.parse_format(f.read(), category, name)
    return [(f.name, f.offset, f.size) for f in fmt.fields if not f.name.startswith("common_")]


def field_requirements():
    """(tool, column, tracepoint, field) for every column that names a field."""
    out = []
    for spec in TOOLS.values():
        for col in spec.columns:
            for req in col.requires:
                if ":" in req and "." in req:
                    tp, fname = req.split(".", 1)
                    out.append((spec.name, col.header, tp, fname))
    return out


# -- saved formats ----------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_tracepoints_reported_as_the_files_say(kernel):
    status, report = run_saved(kernel)
    tps = by_name(report["tracepoints"])
    assert set(tps) == set(doctor.tracepoint_names(TOOLS.values()))
    for name, tp in tps.items():
        expected = saved_fields(kernel, name)
        assert tp["present"] is (expected is not None)
        if expected is not None:
            assert [(f["name"], f["offset"], f["size"]) for f in tp["fields"]] == expected
    assert status == (EXIT_OK if all(c["status"] in ("ok", "partial") for c in report["commands"])
                      else EXIT_KERNEL_TOO_OLD)
    assert report["status"] == status
    assert report["release"] == open(os.path.join(FORMATS, kernel, "KERNEL_RELEASE")).read().strip()


@pytest.mark.parametrize("kernel", KERNELS)
def test_states_runs_on_every_saved_kernel(kernel):
    # sock:inet_sock_set_state (4.16) has every field states reads on all of them.
    _status, report = run_saved(kernel)
    assert by_name(report["commands"])["states"]["status"] == "ok"


@pytest.mark.parametrize("kernel,ring", [("4.19", "warn"), ("5.4", "warn"), ("5.10", "ok"), ("6.18", "ok")])
def test_ring_buffer_judged_by_the_saved_release(kernel, ring):
    _status, report = run_saved(kernel)
    checks = by_name(report["checks"])
    assert checks["ring buffer"]["status"] == ring
    assert checks["btf"]["status"] == "skip"
    assert "privileges" not in checks and "bcc" not in checks


def test_4_19_retransmit_skb_has_neither_state_nor_family():
    _status, report = run_saved("4.19")
    fields = by_name(report["tracepoints"])[RETRANSMIT]["fields"]
    assert [(f["name"], f["offset"]) for f in fields] == [
        ("skbaddr", 8), ("skaddr", 16), ("sport", 24), ("dport", 26),
        ("saddr", 28), ("daddr", 32), ("saddr_v6", 36), ("daddr_v6", 52)]


@pytest.mark.parametrize("kernel", KERNELS)
def test_columns_needing_an_absent_field_are_blank(kernel):
    _status, report = run_saved(kernel)
    commands = by_name(report["commands"])
    for tool, header, tp, fname in field_requirements():
        fields = saved_fields(kernel, tp)
        command = commands[tool]
        if command["status"] == "unavailable":
            continue
        columns = [c for c in command["columns"] if c["header"] == header]
        if fields is None:
            assert all(c["available"] is False and tp in c["reason"] for c in columns)
        elif fname not in [f[0] for f in fields]:
            assert all(c["available"] is False and f"{tp} has no field {fname}" == c["reason"] for c in columns)
            assert command["status"] == "partial"


def test_hidden_required_tracepoint_makes_the_command_unavailable():
    status, report = run_saved("6.18", hide="sock:inet_sock_set_state")
    assert status == EXIT_KERNEL_TOO_OLD == report["status"]
    command = by_name(report["commands"])["states"]
    assert command["status"] == "unavailable"
    assert command["reason"] == ("tcptrace states needs the tracepoint sock:inet_sock_set_state, which this "
                                 "kernel does not have (Linux 4.16 or later has it).")
    tp = by_name(report["tracepoints"])["sock:inet_sock_set_state"]
    assert tp["present"] is False and tp["detail"] == "absent (hidden by TCPTRACE_HIDE_TRACEPOINTS)"


def expect_retransmit_hidden(report, status):
    """What hiding tcp:tcp_retransmit_skb must do, from the tools' own
    declarations: required -> unavailable, optional -> partial with the
    columns that need it blank."""
    commands = by_name(report["commands"])
    required = []
    for spec in TOOLS.values():
        command = commands[spec.name]
        tp = next((t for t in spec.tracepoints if t.name == RETRANSMIT), None)
        needing = {c.header for c in spec.columns if any(r.split(".")[0] == RETRANSMIT for r in c.requires)}
        if tp is not None and not tp.optional:
            required.append(spec.name)
            assert command["status"] == "unavailable"
            assert RETRANSMIT in command["reason"] and "Linux 4.15" in command["reason"]
        elif tp is not None or needing:
            assert command["status"] == "partial", spec.name
            assert any(m.startswith(RETRANSMIT) and "hidden" in m for m in command["missing"])
            for col in command["columns"]:
                assert (col["available"] is False) == (col["header"] in needing), (spec.name, col)
        else:
            assert command["status"] == "ok", spec.name
    assert status == (EXIT_KERNEL_TOO_OLD if required else EXIT_OK) == report["status"]
    assert by_name(report["tracepoints"])[RETRANSMIT]["present"] is False


def test_hidden_retransmit_skb_on_saved_formats():
    status, report = run_saved("6.18", hide=RETRANSMIT)
    expect_retransmit_hidden(report, status)


def test_table_names_the_affected_commands_and_why():
    result = CliRunner().invoke(cli, ["doctor", "--formats", os.path.join(FORMATS, "6.18")],
                                env={HIDE: RETRANSMIT})
    users = [s.name for s in TOOLS.values() if any(t.name == RETRANSMIT for t in s.tracepoints)]
    lines = result.output.splitlines()
    assert lines[0].startswith("tcptrace doctor: Linux 6.18")
    for name in users:
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.split()[1] in ("unavailable", "partial")
    assert "TCPTRACE_HIDE_TRACEPOINTS" in result.output
    assert max(len(line) for line in lines) <= 80


@pytest.mark.parametrize("kernel", KERNELS)
def test_table_fits_80_columns(kernel):
    result = CliRunner().invoke(cli, ["doctor", "--formats", os.path.join(FORMATS, kernel)])
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    for section in ("CHECK", "TRACEPOINT", "COMMAND"):
        assert any(line.startswith(section) for line in lines)
    for name in TOOLS:
        assert any(line.startswith(name + " ") for line in lines)


def test_table_fits_80_columns_wherever_the_formats_are(tmp_path):
    # The saved-formats path is the user's: a deep one must wrap, not widen.
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 4, "6.18")
    shutil.copytree(os.path.join(FORMATS, "6.18"), deep)
    result = CliRunner().invoke(cli, ["doctor", "--formats", str(deep)])
    lines = result.output.splitlines()
    assert lines[0] == "tcptrace doctor: Linux " + runtime.formats_source(str(deep)).kernel_release() + " (saved formats)"
    assert max(len(line) for line in lines) <= 80
    assert "a-rather-long-directory-name" in result.output


def demo_spec():
    """states with columns declaring each kind of requirement."""
    return replace(
        states.SPEC,
        name="demo",
        tracepoints=states.SPEC.tracepoints + (Tracepoint("tcp:tcp_probe", ("srtt",), "4.16", optional=True),),
        columns=states.SPEC.columns + (
            Column("srtt", "SRTT", requires=("tcp:tcp_probe.srtt",)),
            Column("ghost", "GHOST", requires=("tcp:tcp_probe.no_such_field",)),
            Column("acked", "ACKED", requires=("tcp_sock.bytes_acked",)),
            Column("csum", "CSUM", requires=("tcp:tcp_bad_csum",)),
        ),
    )


def columns_of(command):
    return {c.header: (c.available, c.reason) for c in command.columns if c.header in (
        "SRTT", "GHOST", "ACKED", "CSUM", "RPORT")}


def source(kernel, hidden=()):
    return tracefs.FormatSource(os.path.join(FORMATS, kernel), hidden)


def test_column_requirements_each_kind():
    found = doctor.judge(demo_spec(), source("6.18"), lambda s, m: {"bytes_received": (1752, 8)})
    assert found.status == "partial"
    assert columns_of(found) == {
        "RPORT": (True, ""),
        "SRTT": (True, ""),
        "GHOST": (False, "tcp:tcp_probe has no field no_such_field"),
        "ACKED": (False, "the kernel's BTF has no tcp_sock.bytes_acked"),
        "CSUM": (True, ""),
    }


def test_column_requirements_without_btf_and_tracepoints():
    hidden = source("6.18", hidden=("tcp:tcp_probe", "tcp:tcp_bad_csum"))
    found = doctor.judge(demo_spec(), hidden, lambda s, m: None)
    assert columns_of(found)["SRTT"] == (
        False, "tcp:tcp_probe unavailable (tracepoint absent (hidden by TCPTRACE_HIDE_TRACEPOINTS))")
    assert columns_of(found)["CSUM"] == (
        False, "tcp:tcp_bad_csum unavailable (tracepoint absent (hidden by TCPTRACE_HIDE_TRACEPOINTS))")
    assert columns_of(found)["ACKED"] == (False, "no BTF (/sys/kernel/btf/vmlinux) to find tcp_sock.bytes_acked")
    # 4.19 has tcp_probe but no tcp_bad_csum (Linux 5.14).
    old = doctor.judge(demo_spec(), source("4.19"), lambda s, m: {"bytes_acked": (1824, 8)})
    assert columns_of(old)["SRTT"] == (True, "") and columns_of(old)["ACKED"] == (True, "")
    assert columns_of(old)["CSUM"] == (False, "tcp:tcp_bad_csum unavailable (tracepoint absent)")


def test_btf_columns_not_judged_for_saved_formats():
    report = doctor.diagnose(os.path.join(FORMATS, "6.18"), specs=[demo_spec()])
    command = report.command("demo")
    assert columns_of(command)["ACKED"] == (None, "BTF of the saved kernel is unknown")
    assert report.status == EXIT_OK
    assert "ACKED: need BTF, not judged for saved formats" in doctor.render_table(report)


@pytest.mark.parametrize("failed,status", [
    (("privileges", "bcc", "tracefs"), EXIT_PRIVILEGE),
    (("bcc", "tracefs"), EXIT_NO_BCC),
    (("tracefs",), EXIT_NO_TRACEFS),
    ((), EXIT_KERNEL_TOO_OLD),
])
def test_exit_status_names_the_first_obstacle(failed, status):
    report = doctor.Report("6.18", "test")
    for name in ("privileges", "bcc", "tracefs"):
        report.checks.append(doctor.Check(name, doctor.FAIL if name in failed else doctor.OK, ""))
    report.commands = [doctor.CommandReport("states", "unavailable", "needs")]
    assert doctor.exit_status(report) == status


def test_exit_status_for_a_failed_build_and_for_success():
    report = doctor.Report("6.18", "test", commands=[doctor.CommandReport("states", "partial")])
    assert doctor.exit_status(report) == EXIT_OK
    report.commands.append(doctor.CommandReport("life", "unavailable", "failed to compile", build="failed"))
    assert doctor.exit_status(report) == EXIT_BUILD_FAILED


@pytest.mark.parametrize("args", [["-o", "csv"], ["-o", ""], ["--formats", "/no/such/dir"], ["--bogus"]])
def test_usage_errors(args):
    result = CliRunner().invoke(cli, ["doctor", *args])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_doctor_needs_no_bcc_import():
    code = ("import sys; from tcptrace.cli import cli; from tcptrace import doctor; "
            f"r = doctor.diagnose({os.path.join(FORMATS, '6.18')!r}); "
            "assert 'bcc' not in sys.modules, 'bcc imported'; print(r.status)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_help_lists_doctor():
    result = CliRunner().invoke(cli, ["--help"])
    assert "doctor" in result.output
    result = CliRunner().invoke(cli, ["doctor", "--help"])
    assert result.exit_code == 0 and "--compile" in result.output and "--formats" not in result.output


# -- this machine (privileged) ----------------------------------------------------


def doctor_live(*args, hide=None, user=None):
    env = dict(os.environ)
    env.pop(HIDE, None)
    if hide:
        env[HIDE] = hide
    cmd = [sys.executable, "-m", "tcptrace", "doctor", "-o", "json", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def test_live_everything_available(bpf):
    status, report = doctor_live()
    checks = by_name(report["checks"])
    assert {name: c["status"] for name, c in checks.items()} == {
        "kernel": "ok", "privileges": "ok", "bcc": "ok", "tracefs": "ok", "btf": "ok", "build": "ok",
        "ring buffer": "ok"}
    assert checks["kernel"]["detail"].startswith(f"Linux {os.uname().release}")
    assert checks["privileges"]["detail"] == "root; readers get CPU time reserved (SCHED_DEADLINE)"
    assert checks["bcc"]["detail"].startswith("bcc 0.")
    assert checks["build"]["detail"].startswith("header-free")
    for tp in report["tracepoints"]:
        assert tp["present"] is True and tp["fields"], tp["name"]
    assert {c["name"]: c["status"] for c in report["commands"]} == {name: "ok" for name in PROGRAMS}
    assert status == EXIT_OK == report["status"]


def test_live_compiles_every_program_header_free(bpf):
    status, report = doctor_live("--compile")
    assert {c["name"]: c["build"] for c in report["commands"]} == {name: "header-free" for name in PROGRAMS}
    assert status == EXIT_OK


def test_live_hidden_retransmit_skb(bpf):
    status, report = doctor_live(hide=RETRANSMIT)
    expect_retransmit_hidden(report, status)


def test_live_hidden_required_tracepoint(bpf):
    status, report = doctor_live(hide="sock:inet_sock_set_state")
    assert status == EXIT_KERNEL_TOO_OLD
    assert by_name(report["commands"])["states"]["status"] == "unavailable"


def test_live_unprivileged_user(bpf):
    status, report = doctor_live(user=65534)
    assert status == EXIT_PRIVILEGE == report["status"]
    assert by_name(report["checks"])["privileges"]["status"] == "fail"
    assert "CAP_BPF" in by_name(report["checks"])["privileges"]["detail"]


def doctor_in_private_mounts(script_before):
    """doctor -o json after `script_before` ran in a private mount namespace."""
    cmd = " ".join([sys.executable, "-m", "tcptrace", "doctor", "-o", "json"])
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", f"{script_before} exec {cmd}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def test_live_without_bcc_names_the_package(bpf):
    _bcc, where = runtime.find_bcc()
    bcc_dir = where
    status, report = doctor_in_private_mounts(f"mount -t tmpfs none {bcc_dir} &&")
    check = by_name(report["checks"])["bcc"]
    assert check["status"] == "fail" and "apt-get install python3-bpfcc" in check["detail"]
    assert status == EXIT_NO_BCC == report["status"]
    # Without bcc the kernel is still judged: the tools themselves are fine.
    assert {c["status"] for c in report["commands"]} == {"ok"}


def test_live_mounts_a_missing_tracefs(bpf):
    status, report = doctor_in_private_mounts(
        "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug/tracing 2>/dev/null;")
    assert by_name(report["checks"])["tracefs"]["detail"] == "mounted it now at /sys/kernel/tracing"
    assert status == EXIT_OK
