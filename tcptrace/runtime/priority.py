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


class Priority:
    def __init__(self, say=None):
        self.say = say or (lambda text: None)
        self.raised = False
        self.base_nice = None
        self.base_group = None  # the autogroup's nice, when raised too

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
                _set_autogroup(READER_NICE)
                self.base_group = group
            except OSError:
                pass
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
