"""Faults a user meets, produced for real: an unprivileged user, bcc
hidden from the process, tracefs out of reach, a tracepoint the kernel
lacks, signals, closed pipes. Each ends in one sentence and its own exit
status, with nothing left attached in the kernel."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, Tracer, free_port, must_run, read_until, ready, session, tcptrace_cmd
from tcptrace import errors

PY = sys.executable


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)


def one_sentence(stderr):
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert lines and "Traceback" not in stderr, stderr
    return lines[-1]


def test_unprivileged_user(bpf, report):
    result = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                  *tcptrace_cmd("states")])
    assert result.returncode == errors.EXIT_PRIVILEGE, result.stderr
    assert "root" in one_sentence(result.stderr) and "CAP_BPF" in result.stderr
    report("Faults", 'run as an unprivileged user (setpriv nobody, no capabilities)', f"exit {result.returncode}: {one_sentence(result.stderr)}")


def test_bcc_missing(bpf, report):
    """bcc hidden by an empty tmpfs over its directory in a private mount namespace."""
    from tcptrace import runtime

    _module, bcc_dir = runtime.find_bcc()
    script = f"mount -t tmpfs none {bcc_dir} && exec {' '.join(tcptrace_cmd('states'))}"
    result = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    assert result.returncode == errors.EXIT_NO_BCC, result.stderr
    assert "python3-bpfcc" in one_sentence(result.stderr)
    report("Faults", "bcc's module hidden (empty tmpfs over it, private mount namespace)", f"exit {result.returncode}: {one_sentence(result.stderr)}")


def test_tracefs_unmountable(bpf, report):
    """No tracefs and a user with the capabilities tracing needs but not root
    (nor CAP_SYS_ADMIN): it cannot mount it."""
    caps = "+bpf,+perfmon,+dac_read_search"
    script = (
        "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug/tracing 2>/dev/null; "
        "umount -l /sys/kernel/debug 2>/dev/null; "
        f"exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps={caps} "
        f"--ambient-caps={caps} {' '.join(tcptrace_cmd('states'))}"
    )
    result = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    assert result.returncode == errors.EXIT_NO_TRACEFS, result.stderr
    assert "tracefs" in one_sentence(result.stderr)
    report("Faults", 'tracefs unmounted, user with CAP_BPF+CAP_PERFMON+CAP_DAC_READ_SEARCH but not root', f"exit {result.returncode}: {one_sentence(result.stderr)}")


def test_tracefs_mounted_when_missing(bpf, report):
    """As root, a missing tracefs is mounted (in a private mount namespace here)."""
    script = (
        "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug/tracing 2>/dev/null; "
        f"exec {' '.join(tcptrace_cmd('states', '--duration', '0.2', '--verbose'))}"
    )
    result = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    assert result.returncode == 0, result.stderr
    assert "tcptrace states: tracing TCP state changes for 0.2 s; Ctrl-C to end" in result.stderr
    report("Faults", 'tracefs unmounted, run as root', f"exit {result.returncode}: {one_sentence(result.stderr)}")


def test_missing_tracepoint(bpf, report):
    result = run(tcptrace_cmd("states"), env=dict(os.environ, TCPTRACE_HIDE_TRACEPOINTS="sock:inet_sock_set_state"))
    assert result.returncode == errors.EXIT_KERNEL_TOO_OLD
    assert "sock:inet_sock_set_state" in one_sentence(result.stderr) and "4.16" in result.stderr
    report("Faults", 'sock:inet_sock_set_state absent (TCPTRACE_HIDE_TRACEPOINTS)', f"exit {result.returncode}: {one_sentence(result.stderr)}")


def bpf_programs():
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def programs_of(pid):
    """IDs of the BPF programs a process holds, from its fds' fdinfo."""
    ids = set()
    fdinfo = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fdinfo):
        try:
            with open(os.path.join(fdinfo, fd)) as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_end_cleanly_and_detach(bpf, sig, report):
    with Tracer("states", "-o", "json") as t:
        ids = programs_of(t.proc.pid)
        assert ids, "the tracer's programs are visible while it runs"
        assert ids <= {p["id"] for p in bpf_programs()}
        assert t.stop(sig=sig) == 0
    assert "Traceback" not in t.stderr
    remaining = {p["id"] for p in bpf_programs()}
    assert not ids & remaining, "programs stayed loaded after exit"
    report("Faults", f"{sig.name} while tracing", f"exit {t.returncode}; its {len(ids)} BPF programs unloaded")


def test_closed_pipe_true(bpf, report):
    """`tcptrace states | true`: the reader is gone before the first row."""
    cport = free_port()
    proc = subprocess.Popen(" ".join(tcptrace_cmd("states", "-L", str(cport), "--duration", "15", "--verbose"))
                            + " | true; echo status=${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready(proc)
    session("127.0.0.1", free_port(), cport)
    out, err = proc.communicate(timeout=30)
    assert "status=0" in out and "Traceback" not in err
    report("Faults", "`tcptrace states | true` (reader gone before the first row)", "exit 0, nothing on stderr")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("count", [False, True])
def test_stop_while_the_reader_no_longer_reads(bpf, report, sig, count):
    """stdout and stderr are pipes whose reader is alive but has stopped
    reading: once they are full every write blocks. One signal must still
    end the run, with its programs unloaded."""
    import fcntl

    cport = free_port()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (out_r, err_r):
        fcntl.fcntl(fd, 1031, 4096)  # F_SETPIPE_SZ: one page fills fast
    args = ["states", "-L", str(cport), "-o", "json"]
    if count:  # the count summary every interval, written to the same stuck pipe
        args = ["retrans", "-c", "-i", "0.01"]
    proc = subprocess.Popen(tcptrace_cmd(*args, "--verbose"), cwd=ROOT, stdout=out_w, stderr=err_w)
    os.close(out_w)
    os.close(err_w)
    try:
        deadline = time.monotonic() + 30
        while not programs_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        ids = programs_of(proc.pid)
        assert ids, "the tracer did not load its programs"
        if count:
            os.read(err_r, 4096)  # let --verbose through; the summaries fill stdout
        else:
            sport = free_port()
            for _ in range(60):  # 300 rows of JSON: well past a page
                session("127.0.0.1", sport, cport)
        while time.monotonic() < deadline:
            stack = open(f"/proc/{proc.pid}/wchan").read()
            if "pipe" in stack:
                break
            time.sleep(0.2)
        assert "pipe" in stack, f"the tracer is not blocked on its output ({stack})"
        proc.send_signal(sig)
        status = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(out_r)
        os.close(err_r)
    assert status in (errors.EXIT_OK, errors.EXIT_LOST_EVENTS)
    assert not ids & {p["id"] for p in bpf_programs()}, "programs stayed loaded after exit"
    what = "`retrans -c -i 0.01`" if count else "`states -o json`"
    report("Faults", f"{sig.name} to {what} blocked on stdout and stderr pipes nobody reads",
           f"exit {status} within the 1 s grace for output; its BPF programs unloaded")


def test_stop_while_the_reader_is_slow_prints_every_row(bpf, report):
    """A stop signal while a write is blocked on a reader that is only
    slow: the write finishes once the reader reads again (within the
    grace), and every row of the run reaches it, none lost in silence."""
    import fcntl

    cport = free_port()
    out_r, out_w = os.pipe()
    fcntl.fcntl(out_r, 1031, 4096)  # F_SETPIPE_SZ: one page fills fast
    proc = subprocess.Popen(tcptrace_cmd("states", "-L", str(cport), "-o", "json"), cwd=ROOT, stdout=out_w,
                            stderr=subprocess.PIPE, text=True)
    os.close(out_w)
    try:
        deadline = time.monotonic() + 30
        while not programs_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert programs_of(proc.pid), "the tracer did not load its programs"
        sport = free_port()
        sessions = 60  # 300 rows of JSON: well past a page
        for _ in range(sessions):
            session("127.0.0.1", sport, cport)
        while "pipe" not in open(f"/proc/{proc.pid}/wchan").read() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)  # the reader comes back within the grace
        with os.fdopen(out_r, "rb") as out:
            rows = out.read().splitlines()
        status = proc.wait(timeout=30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == errors.EXIT_OK, err
    assert len(rows) == 5 * sessions and "not printed" not in err, err
    report("Faults", "SIGINT while blocked writing to a slow reader (one-page pipe) that then reads again",
           f"exit {status}; all {len(rows)} rows printed")


def test_two_tracers_see_every_event(bpf, report):
    sport, cport = free_port(), free_port()
    with Tracer("states", "-o", "json", "-L", str(cport)) as a, Tracer("states", "-o", "json", "-L", str(cport)) as b:
        for _ in range(5):
            session("127.0.0.1", sport, cport)
        a.stop()
        b.stop()
    assert len(a.json_rows()) == len(b.json_rows()) == 25
    report("Faults", "two tracers at once, 5 sessions", "25 rows each: both see every change")


def stock_headers(tmp_path):
    """The distribution's kernel headers gathered into one tree (Debian
    splits them into an -<arch> and a -common directory), as bcc's stock
    tools need; tcptrace itself never does. Symlinks only, in tmp_path."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    for common in sorted(glob.glob("/usr/src/linux-headers-*-common"), reverse=True):
        specific = common[: -len("common")] + arch
        if os.path.isdir(specific):
            tree = tmp_path / "headers"
            for part in (common, specific):
                subprocess.run(["cp", "-asf", part + "/.", str(tree)], check=True)
            return tree
    return None


def test_beside_a_stock_bcc_tool(bpf, report, tmp_path):
    """bcc's own tcpstates and tcptrace attached to the same tracepoint at
    the same time: each sees every change."""
    tool = shutil.which("tcpstates-bpfcc") or shutil.which("tcpstates")
    headers = stock_headers(tmp_path)
    if tool is None or headers is None:
        why = "bcc's tcpstates (bpfcc-tools) or the distribution's kernel headers are not installed"
        if must_run():
            pytest.fail(f"must run in CI but cannot: {why}")
        pytest.skip(why)
    sport, cport = free_port(), free_port()

    def mine(lines):
        return [line for line in lines if "->" in line and str(cport) in line.split()]

    stock = subprocess.Popen([tool, "-L", str(cport)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, BCC_KERNEL_SOURCE=str(headers), PYTHONUNBUFFERED="1"))
    try:
        header = stock.stdout.readline()  # printed once its program is attached
        assert "SKADDR" in header, stock.stderr.read() if stock.poll() is not None else header
        with Tracer("states", "-o", "json", "-L", str(cport)) as ours:
            for _ in range(5):
                session("127.0.0.1", sport, cport)
            ours.stop()
        seen = read_until(stock.stdout, lambda lines: len(mine(lines)) >= 25, "25 rows from bcc's tcpstates", 30)
        stock.send_signal(signal.SIGINT)
        out, err = stock.communicate(timeout=30)
        out = "".join(seen) + out
    finally:
        if stock.poll() is None:
            stock.kill()
            stock.wait()
    theirs = mine(out.splitlines())
    assert len(ours.json_rows()) == 25, ours.stderr
    assert len(theirs) == 25, out + err
    report("Faults", "beside bcc's own tcpstates, 5 sessions", "25 rows each: both see every change")


def test_full_disk_stdout(bpf, report):
    """stdout on a full device (/dev/full): a clear failure, no traceback."""
    cport = free_port()
    with open("/dev/full", "w") as full:
        proc = subprocess.Popen(tcptrace_cmd("states", "-L", str(cport), "--duration", "10", "--verbose"),
                                cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True)
        ready(proc)
        session("127.0.0.1", free_port(), cport)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == errors.EXIT_FAILURE, err
    assert "Traceback" not in err and "cannot write the output (No space left on device)" in err
    report("Faults", "stdout on a full device (/dev/full)", f"exit {proc.returncode}: {one_sentence(err)}")


def test_verifier_rejection(bpf, report, monkeypatch):
    """A program the kernel's verifier refuses (here: a read past the end of
    the tracepoint record) ends in one sentence and exit status 8."""
    import io
    from dataclasses import replace

    from tcptrace import codegen, runtime
    from tcptrace.tools import states

    good = codegen.bpf_source

    def source(name):
        text = good(name)
        if name == "states.bpf.c":
            text = text.replace("\tu64 skaddr = args->skaddr;",
                                "\tu64 skaddr = *(u64 *)((char *)args + 4096);")
        return text

    monkeypatch.setattr(codegen, "bpf_source", source)
    session = runtime.Session(replace(states.SPEC), runtime.RunOptions(), None, err=io.StringIO())
    with pytest.raises(errors.BuildError) as caught:
        session.open()
    session.close()
    assert caught.value.exit_code == errors.EXIT_BUILD_FAILED
    assert "verifier" in str(caught.value) and "sock:inet_sock_set_state" in str(caught.value)
    report("Faults", "a program the verifier rejects (a read past the tracepoint record)",
           f"exit {caught.value.exit_code}: tcptrace: {caught.value}")


@pytest.mark.parametrize("cache", ["cached", "bcc"])
def test_skipped_runs_are_read_from_the_programs_attached(bpf, monkeypatch, cache):
    """The kernel counts, per program, the events it did not hand over
    because the program was already running on that CPU; the run adds them
    to its losses. Both load paths must find their programs' counters."""
    import io

    from tcptrace import output, runtime
    from tcptrace.runtime import bpfsys
    from tcptrace.runtime.losses import recursion_misses
    from tcptrace.tools import states

    if cache == "bcc":
        monkeypatch.setenv("TCPTRACE_NO_CACHE", "1")
    writer = output.writer("json", io.StringIO(), states.SPEC.columns, tool="states")
    session = runtime.Session(states.SPEC, runtime.RunOptions(), writer, err=io.StringIO())
    try:
        session.open()
        fds = session.program.program_fds(session.functions)
        assert list(fds) == [tp.function for tp in states.SPEC.tracepoints]
        listed = {p["id"] for p in bpf_programs()}
        assert {bpfsys.prog_id(fd) for fd in fds.values()} <= listed
        assert recursion_misses(session.program, session.functions) == 0
        session.read_stats()
        assert session.losses.skipped == 0 and session.losses.lost == 0
    finally:
        session.close()


def test_second_interrupt_while_finishing(bpf, report):
    """Two Ctrl-C in a row (the second while the run ends): still status 0
    and no traceback."""
    with Tracer("states", "-o", "json") as t:
        t.proc.send_signal(signal.SIGINT)
        t.proc.send_signal(signal.SIGINT)
        assert t.wait(timeout=30) == 0, t.stderr
    assert "Traceback" not in t.stderr
    report("Faults", "two SIGINTs in a row (Ctrl-C twice)", f"exit {t.returncode}, nothing on stderr but the run's summary")


@pytest.mark.parametrize("failure", ["child fails", "child killed"])
def test_a_failed_build_in_a_child_is_made_here(bpf, monkeypatch, tmp_path, failure, report):
    """With nothing cached, bcc compiles in a child process; when that child
    fails (or dies), the program is built in the tracer itself, which works
    as before and says so with --verbose."""
    import io

    from tcptrace import output, runtime
    from tcptrace.tools import states

    from tcptrace.runtime import bcc as bcc_runtime

    parent = os.getpid()
    real = bcc_runtime.find_bcc

    def find_bcc():
        if os.getpid() != parent:  # only in the child made by the fork
            if failure == "child killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise errors.BccMissingError("not in the child")
        return real()

    monkeypatch.setattr(bcc_runtime, "find_bcc", find_bcc)
    monkeypatch.setenv("TCPTRACE_CACHE_DIR", str(tmp_path))
    err = io.StringIO()
    writer = output.writer("table", io.StringIO(), states.SPEC.columns)
    session = runtime.Session(states.SPEC, runtime.RunOptions(verbose=True), writer, err=err)
    try:
        session.open()
        assert session.program.build_mode == "header-free" and not session.program.built_apart, err.getvalue()
        assert "bcc" in sys.modules
        assert session.attached == [tp.name for tp in states.SPEC.tracepoints]
    finally:
        session.close()
    text = err.getvalue()
    assert "the build in a child process failed; building here" in text and "not in the child" not in text
    report("Faults", f"the first run's build in a child process: {failure}",
           "built in the tracer instead, traced as usual; --verbose says so")
