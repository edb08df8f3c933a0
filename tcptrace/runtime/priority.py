"""The reader's CPU time while it reads events.

Measured on 2 CPUs, 8 client/server pairs of loopback connections at full
speed (about 600,000 state changes in 2 s), the reader in a session of its
own as from another terminal: it was runnable for 1.6-2.0 s of the 2.1 s and
ran for 0.04-0.3 s of it. Its cost per row was not what limited it; its
share of the CPUs was. A bigger buffer only postpones the loss and holds its
memory for the whole run.

A nice value of -10 (for the process and its session's autogroup, the unit
the scheduler shares the CPUs between when it groups tasks by session)
helped most of the time and not always: at 2 pairs the reader still waited
up to a second at a time in one load of three. SCHED_DEADLINE reserves it
DL_RUNTIME_NS in every DL_PERIOD_NS: it waited about 10 ms in a 2 s load
and kept up at every load the bench drives, while the load kept the rest of
the machine. It is bounded both ways: the reader gets that time whenever it
has rows to write, and never more than 90 % of one CPU, however far behind
it is; with nothing to read it takes nothing.

Where the kernel refuses it (no CAP_SYS_NICE; EBUSY when the CPUs' deadline
bandwidth is already reserved, e.g. by other tracers; a CPU affinity that
does not span the machine) the reader runs at nice -10 instead, and its
session's autogroup too, put back at exit; the autogroup is the session's,
shared with the shell tcptrace was started from, so a small shell process of
the session puts its value back should tcptrace be killed before it can. A
process started with a priority of its own (`nice -n 5 tcptrace ...`, `chrt
...`) keeps it, and so does a session whose autogroup was given one.
Without CAP_SYS_NICE nothing changes, and --verbose says so.
"""

import ctypes
import os
import resource

from .preflight import capabilities

READER_NICE = -10
AUTOGROUP = "/proc/self/autogroup"
CAP_SYS_NICE = 23

# SCHED_DEADLINE: DL_RUNTIME_NS of CPU in every DL_PERIOD_NS, guaranteed and
# never more: at most 90 % of one CPU, whatever the load.
SCHED_DEADLINE = 6
SCHED_FLAG_RESET_ON_FORK = 0x01  # a child starts as an ordinary task
SCHED_RESET_ON_FORK = 0x40000000  # how sched_getscheduler() reports it
DL_RUNTIME_NS, DL_PERIOD_NS = 9_000_000, 10_000_000
POLICIES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE", 6: "SCHED_DEADLINE"}
SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "ppc64le": 355, "s390x": 345, "riscv64": 274}


def can_reserve():
    """Whether the kernel would grant the reader SCHED_DEADLINE: it asks
    for CAP_SYS_NICE (an RLIMIT_NICE does not do)."""
    return bool(capabilities() & (1 << CAP_SYS_NICE))


def can_raise():
    """Whether this process may raise its priority to READER_NICE:
    CAP_SYS_NICE, or an RLIMIT_NICE that allows it (20 - nice)."""
    if can_reserve():
        return True
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    return soft == resource.RLIM_INFINITY or soft >= 20 - READER_NICE


def _read_autogroup():
    """The nice value in this process's autogroup file, whether or not the
    kernel uses it; None without the file, and for a process still in the
    kernel's first session (one never moved to a session of its own: its
    file is empty, it has no autogroup to renice)."""
    try:
        with open(AUTOGROUP) as f:
            return int(f.read().split()[-1])  # "/autogroup-123 nice 0"
    except (OSError, ValueError, IndexError):
        return None


def _autogroup_nice():
    """This process's autogroup's nice value, or None when the kernel does
    not group tasks by session (or has no such file)."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            if f.read().strip() != "1":
                return None
    except OSError:
        return None
    return _read_autogroup()


def _set_autogroup(nice):
    with open(AUTOGROUP, "w") as f:
        f.write(str(nice))


def _guard(nice):
    """A shell in this session that puts the autogroup's nice value back
    once this process is gone, however it ends (a SIGKILL included): it
    waits on a pipe that only this process holds open, and ignores the
    signals a terminal sends its whole process group. Returns (pid, the
    pipe's write end)."""
    read, write = os.pipe()
    try:
        pid = os.posix_spawn(
            "/bin/sh", ["sh", "-c", 'trap "" INT QUIT TERM HUP; read _; echo "$0" > /proc/self/autogroup', str(nice)],
            os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, read, 0), (os.POSIX_SPAWN_CLOSE, write)],
        )
    except OSError:
        os.close(write)
        raise
    finally:
        os.close(read)
    return pid, write


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32), ("sched_flags", ctypes.c_uint64),
                ("sched_nice", ctypes.c_int32), ("sched_priority", ctypes.c_uint32),
                ("sched_runtime", ctypes.c_uint64), ("sched_deadline", ctypes.c_uint64),
                ("sched_period", ctypes.c_uint64)]


def _set_deadline():
    """This thread under SCHED_DEADLINE; OSError when the kernel refuses
    (no CAP_SYS_NICE, EBUSY when the CPUs' deadline bandwidth is taken)."""
    nr = SCHED_SETATTR.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "sched_setattr: unknown on this machine")
    attr = _SchedAttr(ctypes.sizeof(_SchedAttr), SCHED_DEADLINE, SCHED_FLAG_RESET_ON_FORK, 0, 0,
                      DL_RUNTIME_NS, DL_PERIOD_NS, DL_PERIOD_NS)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(nr), ctypes.c_long(0), ctypes.byref(attr), ctypes.c_long(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def policy():
    """The calling thread's scheduling policy (os.SCHED_OTHER, ...; 6 is
    SCHED_DEADLINE), without the reset-on-fork flag."""
    return os.sched_getscheduler(0) & ~SCHED_RESET_ON_FORK


class Priority:
    def __init__(self, say=None):
        self.say = say or (lambda text: None)
        self.raised = False
        self.base_nice = None
        self.base_group = None  # the autogroup's nice, when raised too
        self.guard = None
        self.deadline = False  # under SCHED_DEADLINE rather than a nice value

    def raise_(self):
        """Raise the reader's priority, unless the user chose one."""
        base, started = os.getpriority(os.PRIO_PROCESS, 0), policy()
        if base != 0 or started != os.SCHED_OTHER:
            name = POLICIES.get(started, f"scheduling policy {started}")
            self.say(f"the reader keeps the priority it was started with ({name}, nice {base})")
            return False
        try:
            _set_deadline()
        except OSError as e:
            self.say(f"no CPU time reserved for the reader ({e.strerror or e}): nice {READER_NICE} instead")
        else:
            self.base_nice, self.raised, self.deadline = base, True, True
            self.say(f"the reader has {DL_RUNTIME_NS / 1e6:g} ms of CPU in every {DL_PERIOD_NS / 1e6:g} ms "
                     "reserved (SCHED_DEADLINE) while it reads events")
            return True
        try:
            os.setpriority(os.PRIO_PROCESS, 0, READER_NICE)
        except OSError as e:
            self.say(f"the reader's priority stays as it is ({e.strerror or e}; raising it needs CAP_SYS_NICE): "
                     "a load that keeps every CPU busy may starve it of CPU, and events would be lost")
            return False
        self.base_nice, self.raised = base, True
        group = _autogroup_nice()
        if group == 0:
            try:
                self.guard = _guard(group)
                _set_autogroup(READER_NICE)
                self.base_group = group
            except OSError:
                self._end_guard()
        where = " (and its session)" if self.base_group is not None else ""
        self.say(f"the reader{where} runs at nice {READER_NICE} while it reads events")
        return True

    def restore(self):
        """Put back what raise_() changed (lowering a priority is always
        allowed)."""
        if not self.raised:
            return
        self.raised = False
        try:
            if self.deadline:
                self.deadline = False
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            if self.base_group is not None:
                _set_autogroup(self.base_group)
            os.setpriority(os.PRIO_PROCESS, 0, self.base_nice)
        except OSError:
            pass
        self._end_guard()

    def _end_guard(self):
        if self.guard is not None:
            pid, write = self.guard
            self.guard = None
            os.close(write)  # it writes the same value again and exits
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
