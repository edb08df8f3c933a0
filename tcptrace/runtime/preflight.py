"""What must hold before a program is loaded, each missing piece named.

tcptrace runs as root or, on Linux 5.8 and later, as any user with exactly
CAP_BPF (maps and programs), CAP_PERFMON (tracepoint perf events) and
CAP_DAC_READ_SEARCH (tracefs is mode 0700, its format files 0440: the
formats and tracepoint ids are read through it). Before 5.8 the first two
are CAP_SYS_ADMIN. Every check tries the operation or reads the effective
capabilities: os.access() checks the real uid and says no where a
capability says yes.
"""

import os
import resource

from .. import tracefs
from ..errors import PrivilegeError, TracefsError
from .plan import kernel_version

CAP_DAC_READ_SEARCH = 2
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAP_NAMES = {CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
             CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}
CAPS_SINCE = (5, 8, 0)  # CAP_BPF and CAP_PERFMON
MEMCG_SINCE = (5, 11, 0)  # BPF memory charged to the cgroup, not to RLIMIT_MEMLOCK
MEMLOCK_NEEDED = 128 << 20  # the ring buffer (up to 64 MiB) and the maps, with room


def capabilities(status="/proc/self/status"):
    """The effective capability mask of this process."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def needed_capabilities(version=None):
    """What loading and attaching needs. CAP_DAC_READ_SEARCH is checked
    where it matters, by reading tracefs: root owns those files and reads
    them without it."""
    version = version or kernel_version()
    if version >= CAPS_SINCE:
        return (CAP_BPF, CAP_PERFMON)
    return (CAP_SYS_ADMIN,)


def missing_capabilities(caps=None, version=None):
    caps = capabilities() if caps is None else caps
    if caps & (1 << CAP_SYS_ADMIN):
        return []  # it covers CAP_BPF and CAP_PERFMON on every kernel
    return [CAP_NAMES[c] for c in needed_capabilities(version) if not caps & (1 << c)]


def check_privileges(caps=None, version=None):
    missing = missing_capabilities(caps, version)
    if not missing:
        return
    need = " + ".join(CAP_NAMES[c] for c in needed_capabilities(version) + (CAP_DAC_READ_SEARCH,))
    raise PrivilegeError(
        f"tcptrace loads BPF programs into the kernel: run it as root or with {need}; "
        f"this process lacks {', '.join(missing)}."
    )


def check_memlock(version=None, limit=None):
    """Before 5.11 BPF maps and programs count against RLIMIT_MEMLOCK, whose
    hard limit only CAP_SYS_RESOURCE may raise: a hard limit too low for the
    maps is named here. The soft limit is raised to the hard one (which needs
    no privilege), so that neither bcc nor the cached loader need more.
    `limit` (soft, hard) stands for this process's own, which is then left alone."""
    version = version or kernel_version()
    if version >= MEMCG_SINCE:
        return
    own = limit is None
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK) if own else limit
    if hard != resource.RLIM_INFINITY and hard < MEMLOCK_NEEDED:
        raise PrivilegeError(
            f"the locked-memory limit is {hard >> 10} KiB and Linux before 5.11 charges BPF maps to it: "
            f"raise it (ulimit -l unlimited, or LimitMEMLOCK=infinity in a systemd unit)."
        )
    if own and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        except (ValueError, OSError):
            pass  # the load itself then says what failed


def formats_source(formats_dir=None):
    """Where format files come from: a saved directory, or tracefs (mounted
    here if it is not yet and this process may)."""
    hidden = tracefs.hidden_from_env()
    if formats_dir:
        return tracefs.FormatSource(formats_dir, hidden)
    root = tracefs.ensure_mounted()
    if not root:
        points = tracefs.mounted()
        if points:
            raise TracefsError(
                f"tracefs is mounted at {points[0]} but this process cannot search it: "
                "run tcptrace as root or give it CAP_DAC_READ_SEARCH."
            )
        raise TracefsError(
            "tracefs is not mounted and mounting it needs root (CAP_SYS_ADMIN): "
            "mount -t tracefs nodev /sys/kernel/tracing."
        )
    probe = os.path.join(root, "events", "sock", "inet_sock_set_state", "format")
    try:
        with open(probe, "rb") as f:
            f.read(1)
    except PermissionError:
        raise TracefsError(
            f"tracefs at {root} is not readable by this process: run tcptrace as root or give it "
            "CAP_DAC_READ_SEARCH."
        ) from None
    except OSError:
        pass  # a kernel without that tracepoint: the tool's own check names what is missing
    return tracefs.FormatSource(root, hidden)
