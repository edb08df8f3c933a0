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
import time

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
    """Looks sockets up in /proc, at most once per endpoint pair, from
    snapshots of the socket and process tables at most refresh seconds old:
    a burst of unknown sockets costs one read of /proc/net/tcp, not one
    each (it lists every socket, TIME_WAIT ones too: reading and parsing
    50,000 took 0.1 s)."""

    def __init__(self, proc="/proc", refresh=1.0, clock=time.monotonic):
        self.proc = proc
        self.cache = {}
        self.refresh = refresh
        self.clock = clock
        self.taken = None
        self.sockets = self.owners = None

    def lookup(self, family, laddr, lport, raddr, rport):
        """(pid, comm) of the socket's owner, or None when unknown."""
        key = (family, laddr, lport, raddr, rport)
        if key in self.cache:
            return self.cache[key]
        now = self.clock()
        if self.taken is None or now - self.taken >= self.refresh:
            self.taken, self.sockets, self.owners = now, None, None
        owner = None
        try:
            if self.sockets is None:
                self.sockets = socket_inodes(self.proc)
            inode = self.sockets.get(key)
            if inode:
                if self.owners is None:
                    self.owners = inode_owners(self.proc)
                owner = self.owners.get(inode)
        except OSError:
            owner = None
        self.cache[key] = owner
        return owner


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): the kernel lists only
# the sockets in the states asked for, where /proc/net/tcp prints every one.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBBI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, an empty sockid
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")  # inet_diag_msg: ..., sockid, expires, queues, uid, inode


def _diag_listeners():
    """{local port: socket inode} of the TCP listeners, through sock_diag."""
    ports = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        for seq, family in enumerate((AF_INET, AF_INET6), 1):
            body = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
            nl.send(_NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                    + body)
            done = False
            while not done:
                data = nl.recv(65536)
                if not data:
                    raise OSError("sock_diag: no answer")
                off = 0
                while off + _NLMSG.size <= len(data):
                    length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
                    if length < _NLMSG.size:
                        raise OSError("sock_diag: a malformed answer")
                    if kind == NLMSG_DONE:
                        done = True
                        break
                    if kind == NLMSG_ERROR:
                        raise OSError("sock_diag refused the request")
                    if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSG.size + _DIAG_MSG.size:
                        msg = _DIAG_MSG.unpack_from(data, off + _NLMSG.size)
                        state, sport, inode = msg[1], msg[4], msg[-1]
                        if state == TCP_LISTEN and inode:
                            ports.setdefault(int.from_bytes(sport, "big"), inode)
                    off += (length + 3) & ~3
    return ports


def _proc_listeners(proc):
    """{local port: socket inode} of the TCP listeners, from proc/net/tcp{,6}."""
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
    return inodes


def listener_owners(proc="/proc"):
    """{local port: (pid, comm)} of the TCP listeners now open, IPv4 and IPv6.

    What the programs' per-port listener owners would hold had these
    listeners been opened while tracing: seeded at start, they let the
    connections such a listener accepts inherit an owner in the kernel.
    The listeners come from sock_diag when this is the machine's own /proc:
    /proc/net/tcp also prints every other socket (50,000 after a busy
    minute, TIME_WAIT ones mostly, took 0.1 s to read and parse, sock_diag
    0.2 ms); the files are the fallback.
    """
    inodes = None
    if proc == "/proc":
        try:
            inodes = _diag_listeners()
        except (OSError, struct.error):
            inodes = None
    if inodes is None:
        inodes = _proc_listeners(proc)
    if not inodes:
        return {}
    owners = inode_owners(proc)
    return {port: owners[inode] for port, inode in inodes.items() if inode in owners}
