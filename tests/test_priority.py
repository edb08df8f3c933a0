"""The reader's priority (runtime/priority.py) and the ring's default size
(plan.ring_pages). The priority changes are real: each case runs in a child
process that leads a session of its own, so the autogroup it renices is its
own and not the test run's."""

import json
import os
import signal
import time

import pytest

from tcptrace.runtime import priority
from tcptrace.runtime.plan import RunOptions, defines_for, ring_pages


def in_child(work):
    """work() -> a JSON-able value, run in a forked child in a new session."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(read)
        try:
            os.setsid()
            result = {"ok": work()}
        except BaseException as e:  # report, never fall back into pytest
            result = {"error": f"{e.__class__.__name__}: {e}"}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result["ok"]




@pytest.fixture
def root():
    if os.geteuid() != 0:
        pytest.skip("raising a priority needs root (CAP_SYS_NICE)")


def state():
    return [os.getpriority(os.PRIO_PROCESS, 0), priority._autogroup_nice(), priority.policy()]


def refuse_deadline():
    """Make the kernel refuse SCHED_DEADLINE for real: it admits only a task
    whose CPU affinity spans every CPU of its root domain."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


AUTOGROUP_SYSCTL = "/proc/sys/kernel/sched_autogroup_enabled"


@pytest.fixture
def grouped(root):
    """Whether the kernel groups tasks by session for this test. Where it
    can but is set not to (kernel.sched_autogroup_enabled = 0, as on some
    machines), grouping is turned on for the test and back off after, so
    the session's part is tested there too; False only where the kernel
    cannot (no such sysctl) or refuses the change. Asked of a new session,
    as the tests' own work runs: the test run's session may be the kernel's
    first (a process never moved to a session of its own, as under some CI
    runners), which has no autogroup of its own to show."""
    try:
        with open(AUTOGROUP_SYSCTL) as f:
            before = f.read().strip()
        if before != "1":
            with open(AUTOGROUP_SYSCTL, "w") as f:
                f.write("1")
    except OSError:
        yield False
        return
    try:
        yield in_child(priority._autogroup_nice) is not None
    finally:
        if before != "1":
            with open(AUTOGROUP_SYSCTL, "w") as f:
                f.write(before)


@pytest.fixture
def two_cpus():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: an affinity cannot make the kernel refuse SCHED_DEADLINE")


def raise_and_restore(prepare=lambda: None):
    """In a child: the priority before, while raised and after restore(),
    restore() twice (harmless), and what the reader said."""
    def work():
        prepare()
        said = []
        p = priority.Priority(said.append)
        seen = {"start": state(), "raised": p.raise_()}
        seen["reading"] = state()
        p.restore()
        seen["end"] = state()
        p.restore()
        seen["said"] = said
        return seen

    return in_child(work)


def test_cpu_time_reserved_for_the_run_and_given_back(root):
    seen = raise_and_restore()
    base, group, policy = seen["start"]
    assert [base, policy] == [0, os.SCHED_OTHER] and seen["raised"]
    assert seen["reading"] == [0, group, priority.SCHED_DEADLINE]  # nice and autogroup untouched
    assert seen["end"] == seen["start"]
    assert seen["said"] == ["the reader has 9 ms of CPU in every 10 ms reserved (SCHED_DEADLINE) while it "
                            "reads events"]


def test_refused_a_reservation_the_reader_runs_at_nice_minus_10(root, two_cpus):
    seen = raise_and_restore(refuse_deadline)
    base, group, policy = seen["start"]
    assert base == 0 and seen["raised"]
    grouped = group is not None  # the kernel groups tasks by session
    assert seen["reading"] == [priority.READER_NICE, priority.READER_NICE if grouped else None, os.SCHED_OTHER]
    assert seen["end"] == seen["start"]
    assert seen["said"][0].startswith("no CPU time reserved for the reader (")
    assert seen["said"][1:] == [f"the reader{' (and its session)' if grouped else ''} runs at nice "
                                f"{priority.READER_NICE} while it reads events"]


def test_a_killed_reader_leaves_its_session_as_it_found_it(grouped, two_cpus):
    """The autogroup is the session's (the shell's, from a terminal): a
    reader killed before it can put it back has a guard that does. Where
    the kernel does not group tasks, the reader leaves the session alone
    and starts no guard."""
    def work():
        ready_r, ready_w = os.pipe()
        reader = os.fork()
        if reader == 0:  # the reader, in the same session
            refuse_deadline()
            p = priority.Priority()
            p.raise_()
            os.write(ready_w, str(p.guard is not None).encode())
            time.sleep(60)
            os._exit(0)
        guard = os.read(ready_r, 5) == b"True"
        raised = priority._autogroup_nice()
        os.kill(reader, signal.SIGKILL)
        os.waitpid(reader, 0)
        deadline = time.monotonic() + 5
        while priority._autogroup_nice() not in (0, None) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [guard, raised, priority._autogroup_nice()]

    if grouped:
        assert in_child(work) == [True, priority.READER_NICE, 0]
    else:
        assert in_child(work) == [False, None, None]


@pytest.mark.parametrize("chosen, said", [
    (lambda: os.setpriority(os.PRIO_PROCESS, 0, 5), "SCHED_OTHER, nice 5"),  # `nice -n 5 tcptrace ...`
    (lambda: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)), "SCHED_BATCH, nice 0"),  # `chrt -b 0`
])
def test_a_priority_chosen_by_the_user_is_kept(root, chosen, said):
    def work():
        chosen()
        told = []
        p = priority.Priority(told.append)
        raised = p.raise_()
        seen = [raised, state()]
        p.restore()
        return seen + [state(), told]

    raised, reading, end, told = in_child(work)
    assert not raised and reading == end
    assert told == [f"the reader keeps the priority it was started with ({said})"]


GROUP_FILE_3 = 3 if os.path.exists(priority.AUTOGROUP) else None


def test_a_session_given_a_nice_value_keeps_it(grouped, two_cpus):
    """A session the user reniced (`renice` of its autogroup) keeps its
    value; so does the autogroup file where the kernel does not group
    tasks (the value is there but does nothing)."""
    def work():
        refuse_deadline()
        try:
            priority._set_autogroup(3)
        except FileNotFoundError:  # a kernel built without autogroups
            pass
        p = priority.Priority()
        p.raise_()
        seen = state() + [priority._read_autogroup()]
        p.restore()
        return seen + state() + [priority._read_autogroup()]

    grouping = 3 if grouped else None
    assert in_child(work) == [priority.READER_NICE, grouping, os.SCHED_OTHER, GROUP_FILE_3,
                              0, grouping, os.SCHED_OTHER, GROUP_FILE_3]


def test_without_the_privilege_the_reader_says_so_and_goes_on(root):
    def work():
        os.setgid(65534)
        os.setuid(65534)  # no CAP_SYS_NICE; the default RLIMIT_NICE allows no raise
        said = []
        p = priority.Priority(said.append)
        raised = p.raise_()
        p.restore()
        return {"said": said, "raised": raised, "nice": os.getpriority(os.PRIO_PROCESS, 0)}

    seen = in_child(work)
    assert not seen["raised"] and seen["nice"] == 0
    first, second = seen["said"]
    assert first.startswith("no CPU time reserved for the reader (Operation not permitted)")
    assert "CAP_SYS_NICE" in second and "events would be lost" in second


def test_who_may_raise_it(root):
    def work():
        seen = [priority.can_raise()]
        os.setgid(65534)
        os.setuid(65534)
        return seen + [priority.can_raise()]

    assert in_child(work) == [True, False]


@pytest.mark.parametrize("cpus, mem_mib, mib", [
    (1, 64000, 8),      # the floor
    (2, 24000, 16),
    (3, 24000, 16),     # a power of two
    (4, 16000, 32),
    (4, 4000, 8),       # 15 MiB: 1/256 of the memory, rounded down
    (8, 64000, 64),
    (192, 10**6, 64),   # the ceiling
    (4, 1024, 4),       # at most 1/256 of the memory
    (1, 300, 1),
])
def test_ring_size_follows_the_machine(cpus, mem_mib, mib):
    pages = ring_pages(cpus, mem_mib, 4096)
    assert pages * 4096 == mib << 20
    assert pages & (pages - 1) == 0


def test_ring_size_is_a_power_of_two_pages_with_large_pages():
    pages = ring_pages(3, 24000, 65536)  # 24 MiB on 64 KiB pages: 16 MiB
    assert pages == 256


def test_buffer_pages_overrides_the_machine():
    from tcptrace.tools import spec

    defs = defines_for(spec("states"), RunOptions(buffer_pages=64), True)
    assert defs["TCPTRACE_RINGBUF_PAGES"] == 64
    defs = defines_for(spec("states"), RunOptions(), True)
    assert defs["TCPTRACE_RINGBUF_PAGES"] == ring_pages()
