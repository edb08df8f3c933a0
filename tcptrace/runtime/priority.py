"""The reader's CPU priority while it reads events.

Measured on 2 CPUs, 8 client/server pairs of loopback connections at full
speed (about 600,000 state changes in 2 s), the reader in a session of its
own as from another terminal: it was runnable for 1.9 s of the 2.1 s and ran
for 0.04-0.3 s of it. Its cost per row was not what limited it; its share of
the CPUs was. A bigger buffer only postpones the loss and holds its memory
for the whole run.

Raised only once the buffer began to fill, the priority came too late: the
buffer was often full before the starved reader ran at all, and it kept
losing afterwards. Raised from the start (nice -10 for the process and for
its session's autogroup, the unit the scheduler shares the CPUs between
when it groups tasks by session), the reader kept up with an 8 MiB ring:
it ran 0.8-0.9 s of the 2.1 s, waited 0.1-0.2 s, and the load ran at 0.75x
its speed without a tracer, the CPU the rows cost.

A priority costs nothing while the reader has nothing to read: it only
decides who waits when the CPUs are short, the load or the rows asked for.
The autogroup is the session's, shared with the shell tcptrace was started
from; a small shell process of the session puts its value back should
tcptrace be killed before it can.
A process started with a nice value of its own (`nice -n 5 tcptrace ...`)
keeps it, and so does one whose autogroup was given one. Raising needs
CAP_SYS_NICE (or an RLIMIT_NICE that allows it); without it the reader runs
as it is and --verbose says so.
"""

import os

READER_NICE = -10
AUTOGROUP = "/proc/self/autogroup"


def _autogroup_nice():
    """This process's autogroup's nice value, or None when the kernel does
    not group tasks by session (or has no such file)."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            if f.read().strip() != "1":
                return None
        with open(AUTOGROUP) as f:
            return int(f.read().split()[-1])  # "/autogroup-123 nice 0"
    except (OSError, ValueError, IndexError):
        return None


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


class Priority:
    def __init__(self, say=None):
        self.say = say or (lambda text: None)
        self.raised = False
        self.base_nice = None
        self.base_group = None  # the autogroup's nice, when raised too
        self.guard = None

    def raise_(self):
        """Raise the reader's priority, unless the user chose one."""
        base = os.getpriority(os.PRIO_PROCESS, 0)
        if base != 0:
            self.say(f"the reader keeps the nice value it was started with ({base})")
            return False
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
