"""sd_notify(3) for a Type=notify systemd service, without libsystemd.

The protocol is one datagram of "KEY=VALUE" lines to the AF_UNIX socket named
in $NOTIFY_SOCKET ('@' first means Linux's abstract namespace). Outside
systemd the variable is unset and every call does nothing, so callers need
not ask whether they run under systemd.
"""

import os
import socket


def _address(env):
    path = env.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # unset, or a transport this does not speak (vsock)


def notify(state, env=None):
    """Send `state` (e.g. "READY=1", "WATCHDOG=1", "STOPPING=1"); True if sent.

    A failure is returned, not raised: systemd notices a missing READY=1 or
    WATCHDOG=1 by itself (a start timeout, a watchdog restart) and says so.
    """
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval(env=None):
    """Seconds within which systemd wants WATCHDOG=1 (WatchdogSec=), or None
    if it watches nothing. Ping at half of it, as sd_watchdog_enabled(3) advises."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    # Set for the service's main process: a child that inherited it is not the one watched.
    if pid and pid != str(os.getpid()):
        return None
    return usec / 1e6
