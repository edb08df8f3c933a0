"""Which workload a socket belongs to: its cgroup v2 (id -> path), the
container and Kubernetes pod that path names, and its network namespace.

The kernel side (tcptrace/bpf/workload.bpf.h) puts the socket's cgroup id
(the inode number of the cgroup's directory) and netns inode on every event;
here the id becomes a path by walking the cgroup2 hierarchy, found in
/proc/self/mountinfo (/sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified
on hybrid ones). Also what the plan needs: which way this kernel's BTF lets
the program read the cgroup, and the --cgroup/--netns filters as map entries.
"""

import errno
import fcntl
import os
import re
import time

MOUNTINFO = "/proc/self/mountinfo"
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file (Linux 4.11+)
CLONE_NEWNET = 0x40000000

# What the program reads, by struct; the plan turns them into OFF_ #defines.
BTF = {
    "sock": ["sk_cgrp_data"],
    "sock_cgroup_data": ["cgroup", "val"],
    "cgroup": ["kn", "level", "ancestors", "ancestor_ids", "id"],
    "kernfs_node": ["id"],
    "sock_common": ["skc_net", "skc_state"],
    "net": ["ns"],
    "ns_common": ["inum"],
}

_SOCKET = ("sock.sk_cgrp_data", "cgroup.kn", "kernfs_node.id")
_NETNS = ("sock_common.skc_net", "net.ns", "ns_common.inum")

# The table's CGROUP column: a container's short id, or the path's tail.
LABEL_WIDTH = 20
SHORT_ID = 12


# -- the kernel side's mode ---------------------------------------------------

def mode(found):
    """How the program learns a socket's cgroup on a kernel whose BTF has
    `found` ({"struct.member": (offset, size)}): (defines, one sentence)."""
    defs = {}
    if found.get("kernfs_node.id", (0, 8))[1] != 8:
        found = {}  # an id of another width: nothing read from a guessed layout
    layout = ("sock_cgroup_data.cgroup" in found or "sock_cgroup_data.val" in found)
    if layout and all(k in found for k in _SOCKET):
        defs["WORKLOAD_SOCKET_CGROUP"] = 1
        new = "sock_cgroup_data.cgroup" in found
        if "cgroup.id" in found:  # before 5.5: ancestor_ids[] are not kernfs ids
            defs["WORKLOAD_ID_BITS32"] = 1
            ancestors = False
        else:
            ancestors = "cgroup.level" in found and ("cgroup.ancestors" in found or "cgroup.ancestor_ids" in found)
        if ancestors:
            defs["WORKLOAD_ANCESTORS"] = 1
        how = (f"the socket's own cgroup (sock.sk_cgrp_data, {'5.15+' if new else 'pre-5.15'} layout)"
               + ("" if ancestors else "; --cgroup matches descendants that exist at the start only"))
    else:
        defs["WORKLOAD_OWNER_CGROUP"] = 1
        if "cgroup.id" in found:
            defs["WORKLOAD_ID_BITS32"] = 1
        how = ("fallback: the cgroup of the task that called connect() or listen(), recorded then "
               "(BTF lacks sock.sk_cgrp_data or cgroup.kn); sockets opened before tracing have none, "
               "and --cgroup matches descendants that exist at the start only")
    if all(k in found for k in _NETNS):
        how += "; netns from sock_common.skc_net"
    else:
        how += "; netns unknown (BTF lacks sock_common.skc_net or ns_common.inum)"
    return defs, how


def netns_readable(found):
    return all(k in found for k in _NETNS)


def filter_settings(cgroups, netns, defs):
    """(defines, maps) of --cgroup (Cgroup items) and --netns (inodes) for
    a program built with `defs` (mode()'s)."""
    out, maps = {}, {}
    if cgroups:
        out["FILTER_CGROUPS"] = 1
        ids = []
        if "WORKLOAD_ANCESTORS" in defs:
            levels = 0
            for c in cgroups:
                levels |= 1 << c.level
                ids.append(c.id)
            out["FILTER_CGROUP_LEVELS"] = levels
        else:
            for c in cgroups:
                ids += [c.id] + descendants(c.directory)
        maps["filter_cgroups"] = [(i, 1) for i in dict.fromkeys(ids)]
    if netns:
        out["FILTER_NETNS"] = 1
        maps["filter_netns"] = [(n, 1) for n in netns]
    return out, maps


# -- the hierarchy ----------------------------------------------------------

def _unescape(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup2_mount(mountinfo=MOUNTINFO):
    """(mount point, root within the hierarchy) of the cgroup2 mount, or None."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep or not right.startswith("cgroup2 "):
            continue
        fields = left.split()
        if len(fields) >= 5:
            return _unescape(fields[4]), _unescape(fields[3])
    return None


def _depth(path):
    return len([p for p in path.split("/") if p])


class Cgroup:
    """A --cgroup value: its directory, id (inode) and level (0: the root)."""

    def __init__(self, directory, id, level):
        self.directory, self.id, self.level = directory, id, level

    def __repr__(self):
        return f"Cgroup({self.directory!r}, id={self.id}, level={self.level})"

    def __eq__(self, other):
        return isinstance(other, Cgroup) and (self.directory, self.id, self.level) == (
            other.directory, other.id, other.level)


class NoCgroup2(ValueError):
    pass


def parse_cgroup(value, mountinfo=MOUNTINFO):
    """A --cgroup PATH: a directory of the cgroup2 hierarchy, given as a
    file system path or relative to the cgroup2 mount (as the `cgroup` key
    shows it). ValueError (NoCgroup2 without a cgroup2 mount) otherwise."""
    found = cgroup2_mount(mountinfo)
    if found is None:
        raise NoCgroup2("this host has no cgroup v2 hierarchy mounted (no cgroup2 line in /proc/self/mountinfo), "
                        "so there is no cgroup to select; mount one (mount -t cgroup2 none /sys/fs/cgroup) "
                        "or drop --cgroup")
    mount, root = found
    mount_real = os.path.realpath(mount)
    candidates = [os.path.realpath(value)]
    if not value.startswith(mount_real + "/"):
        candidates.append(os.path.realpath(os.path.join(mount_real, value.lstrip("/"))))
    for path in candidates:
        if (path == mount_real or path.startswith(mount_real + "/")) and os.path.isdir(path):
            rel = path[len(mount_real):] or "/"
            return Cgroup(path, os.stat(path).st_ino, _depth(root) + _depth(rel))
    raise ValueError(f"{value!r} is not a directory of the cgroup v2 hierarchy (mounted at {mount})")


def parse_netns(value):
    """A --netns PATH (/run/netns/NAME, /proc/PID/ns/net): its inode."""
    try:
        fd = os.open(value, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"cannot open {value!r}: {e.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise ValueError(f"{value!r} is not a namespace file (such as /run/netns/NAME or "
                                 "/proc/PID/ns/net)") from None
            raise ValueError(f"cannot inspect {value!r}: {e.strerror}") from None
        if kind != CLONE_NEWNET:
            raise ValueError(f"{value!r} is a namespace file, but not of a network namespace")
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def descendants(directory):
    """Ids of every cgroup below `directory`, as they are now."""
    out = []
    stack = [directory]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        out.append(entry.inode())
                        stack.append(entry.path)
        except OSError:
            continue
    return out


# -- containers and pods ------------------------------------------------------

# A container's cgroup: docker (systemd `docker-<id>.scope`, cgroupfs
# `/docker/<id>`), containerd's CRI plugin (`cri-containerd-<id>.scope`, or a
# bare `<id>` under kubepods with cgroupfs), cri-o (`crio-<id>.scope`) and
# podman (`libpod-<id>.scope`, cgroupfs `libpod-<id>`). `*-conmon-<id>` is the
# container's monitor, not the container.
_CONTAINER = re.compile(r"^(?:(?:docker|cri-containerd|crio|libpod|containerd)-)?([0-9a-f]{64})(?:\.scope)?$")
# Kubernetes' pod cgroup: systemd `kubepods-<qos>-pod<uid>.slice` (the uid's
# dashes become underscores) or cgroupfs `pod<uid>`.
_POD = re.compile(r"^(?:kubepods(?:-[a-z]+)*-)?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                  r"[-_][0-9a-f]{12})(?:\.slice)?$")


def container_of(path):
    """(container id, pod uid) named by a cgroup path; None where none."""
    if not path:
        return None, None
    parts = [p for p in path.split("/") if p]
    container = pod = None
    for part in parts:
        m = _CONTAINER.match(part)
        if m:
            container = m.group(1)  # the innermost wins
    if any(p.startswith("kubepods") for p in parts):
        for part in parts:
            m = _POD.match(part)
            if m:
                pod = m.group(1).replace("_", "-")
    return container, pod


def label(path, container, width=LABEL_WIDTH):
    """The table's CGROUP text: the container's short id, else the path
    cut on the left to `width` (its tail is what tells cgroups apart)."""
    if container:
        return container[:SHORT_ID]
    if path is None:
        return None
    return path if len(path) <= width else "…" + path[-(width - 1):]


UNKNOWN = (None, None, None, None)  # (path, container, pod uid, label)


class _Unresolved(dict):
    def __missing__(self, key):
        return UNKNOWN


_NOTHING = _Unresolved()


class Resolver:
    """cgroup id -> (path, container, pod uid, label), from the cgroup2
    hierarchy, cached. A miss rescans the hierarchy, but at most `budget`
    seconds per miss and resumed where it stopped on the next one: a
    cgroup made after tracing began resolves at its first events, and a
    host with many thousands of cgroups never stalls the event loop for
    long. An id not found by a whole pass stays unresolved (null) until
    `retry` seconds later: the cgroup has gone."""

    MAX = 65536  # cached ids; past it the cache starts over

    def __init__(self, mountinfo=MOUNTINFO, budget=0.02, retry=5.0, clock=time.monotonic):
        found = cgroup2_mount(mountinfo)
        self.mount = os.path.realpath(found[0]) if found else None
        self.budget, self.retry, self.clock = budget, retry, clock
        self.info = _Table(self)
        self._paths = {}  # id -> path seen by a walk
        self._walk = None  # the pass under way
        self._gone = {}  # id -> when a whole pass missed it
        self.scans = 0
        try:
            self.netns = os.stat("/proc/self/ns/net").st_ino
        except OSError:
            self.netns = 0
        if self.mount:
            self._finish_pass()

    def _walker(self):
        stack = [self.mount]
        try:
            yield os.stat(self.mount).st_ino, "/"
        except OSError:
            return
        while stack:
            top = stack.pop()
            try:
                with os.scandir(top) as it:
                    entries = [(e.inode(), e.path) for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for ino, path in entries:
                stack.append(path)
                yield ino, path[len(self.mount):]

    def _finish_pass(self):
        for ino, path in self._walker():
            self._paths[ino] = path
        self.scans += 1

    def resolve(self, cgroup_id):
        """Bounded: returns the path or None (not found yet, or gone)."""
        path = self._paths.get(cgroup_id)
        if path is not None or not self.mount:
            return path
        now = self.clock()
        if now - self._gone.get(cgroup_id, -self.retry) < self.retry:
            return None
        if self._walk is None:
            self._walk = self._walker()
            self._pass_started = now
        deadline = time.monotonic() + self.budget
        for n, (ino, path) in enumerate(self._walk):
            self._paths[ino] = path
            if ino == cgroup_id:
                return path
            if n % 64 == 63 and time.monotonic() > deadline:
                return None  # resumed at the next miss
        self._walk = None
        self.scans += 1
        if len(self._gone) > self.MAX:
            self._gone.clear()
        self._gone[cgroup_id] = now
        return None

    def entry(self, cgroup_id):
        if not cgroup_id:
            return UNKNOWN
        path = self.resolve(cgroup_id)
        if path is None:
            return UNKNOWN
        container, pod = container_of(path)
        return path, container, pod, label(path, container)


class _Table(dict):
    """id -> entry: a dict, so the table's derived path looks up in C."""

    def __init__(self, resolver):
        super().__init__()
        self.resolver = resolver

    def __missing__(self, cgroup_id):
        value = self.resolver.entry(cgroup_id)
        if value is not UNKNOWN:
            if len(self) >= Resolver.MAX:
                self.clear()
            self[cgroup_id] = value
        return value


def CGROUPS(ctx):
    """id -> (path, container, pod uid, label) for a run (DecodeContext)."""
    resolver = getattr(ctx, "workload", None)
    return resolver.info if resolver is not None else _NOTHING


def row(ctx, cgroup_id, netns):
    """(CGROUP label, cgroup_id, cgroup, container, pod_uid, netns) of an
    event: what spec.CGROUP_COLUMN and spec.WORKLOAD_COLUMNS show."""
    path, container, pod, text = CGROUPS(ctx)[cgroup_id]
    return text, cgroup_id or None, path, container, pod, netns or None


def owners_apply(ctx, netns):
    """Whether /proc's owner lookup (procfs.OwnerResolver, which reads
    tcptrace's own /proc/net/tcp) may answer for a socket of `netns`: a
    4-tuple of another namespace could name an unrelated socket here."""
    resolver = getattr(ctx, "workload", None)
    if resolver is None or not resolver.netns or not netns:
        return True
    return netns == resolver.netns
