"""Socket owners from /proc, for sockets that were open before tracing began.

Events that fire in softirq context (a retransmit, a reset) carry no useful
task. The programs remember owners they saw in process context; for a socket
opened before tracing started, user space looks the 4-tuple up in
/proc/net/tcp{,6} for its inode and then the inode in /proc/<pid>/fd. Results
are cached; a socket that has gone is answered "unknown", never a guess.
"""

import os
import socket
import struct

from .net import AF_INET, AF_INET6


def _hex_addr(family, text):
    raw = bytes.fromhex(text)
    if family == AF_INET:
        return socket.inet_ntop(AF_INET, struct.pack("<I", *struct.unpack(">I", raw)))
    words = struct.unpack(">4I", raw)
    return socket.inet_ntop(AF_INET6, struct.pack("<4I", *words))


def socket_inodes(proc="/proc"):
    """{(family, laddr, lport, raddr, rport): inode} of the TCP sockets now open."""
    out = {}
    for family, name in ((AF_INET, "tcp"), (AF_INET6, "tcp6")):
        try:
            with open(os.path.join(proc, "net", name)) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10:
                        continue
                    local, remote, inode = parts[1], parts[2], int(parts[9])
                    if not inode:
                        continue
                    la, lp = local.split(":")
                    ra, rp = remote.split(":")
                    key = (family, _hex_addr(family, la), int(lp, 16), _hex_addr(family, ra), int(rp, 16))
                    out[key] = inode
        except (OSError, ValueError):
            continue
    return out


def inode_owners(proc="/proc"):
    """{socket inode: (pid, comm)} for every process we can read."""
    owners = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = os.path.join(proc, entry, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        comm = None
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode not in owners:
                    if comm is None:
                        try:
                            with open(os.path.join(proc, entry, "comm")) as f:
                                comm = f.read().strip()
                        except OSError:
                            comm = ""
                    owners[inode] = (int(entry), comm)
    return owners


class OwnerResolver:
    """Looks sockets up in /proc, at most once per endpoint pair."""

    def __init__(self, proc="/proc"):
        self.proc = proc
        self.cache = {}

    def lookup(self, family, laddr, lport, raddr, rport):
        """(pid, comm) of the socket's owner, or None when unknown."""
        key = (family, laddr, lport, raddr, rport)
        if key in self.cache:
            return self.cache[key]
        owner = None
        try:
            inode = socket_inodes(self.proc).get(key)
            if inode:
                owner = inode_owners(self.proc).get(inode)
        except OSError:
            owner = None
        self.cache[key] = owner
        return owner


def listener_owners(proc="/proc"):
    """{local port: (pid, comm)} of the TCP listeners now open, IPv4 and IPv6.

    What the programs' per-port listener owners would hold had these
    listeners been opened while tracing: seeded at start, they let the
    connections such a listener accepts inherit an owner in the kernel.
    """
    inodes = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, "net", name)) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or parts[3] != "0A":  # TCP_LISTEN
                        continue
                    inode = int(parts[9])
                    if inode:
                        inodes.setdefault(int(parts[1].rsplit(":", 1)[1], 16), inode)
        except (OSError, ValueError):
            continue
    if not inodes:
        return {}
    owners = inode_owners(proc)
    return {port: owners[inode] for port, inode in inodes.items() if inode in owners}
