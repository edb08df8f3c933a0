"""Load a compiled program into the kernel again, without bcc.

Compiling with bcc costs about 0.3 s and 85 MiB of LLVM and clang pages per
run, for a result that only changes with the program text, the kernel and
bcc. So the first run keeps what the kernel was given (compiled.Compiled)
and later runs hand the same bytes to the kernel through the bpf() and
perf_event_open() system calls, called through libc's syscall(): no libbcc,
no libbpf, no LLVM. Maps are read and written here as raw bytes.
"""

import ctypes
import errno
import fcntl
import functools
import os
import platform
import re
import resource
import struct
import sys

from ..errors import LoaderError, Unsupported, VerifierError
from .compiled import (
    INSN_SIZE, MAP_TYPES,
    PERCPU_TYPES,
)

# (bpf, perf_event_open) by machine; both are little-endian, which the
# instruction parsing below assumes.
SYSCALLS = {"x86_64": (321, 298), "aarch64": (280, 241)}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25

BPF_ANY = 0  # update flags: create or replace
BPF_NOEXIST = 1  # create only: EEXIST when the kernel got there first
BPF_EXIST = 2  # replace only

OBJ_NAME_LEN = 16
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
ENOTSUPP = 524  # the kernel's own "not supported", which leaks to user space from bpf()

LOG_SIZES = (1 << 20, 1 << 24)  # verifier log buffers tried, the second when the first is full
VERIFIER_LOG_TAIL = 12  # lines of the log put in the error message; all of it stays in .log


def supported():
    """True where this loader knows the system call numbers."""
    return platform.machine() in SYSCALLS and sys.byteorder == "little"


# -- system calls --------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _syscall():
    if not supported():
        raise Unsupported(f"the BPF loader does not know the system calls of {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    func = libc.syscall
    func.restype = ctypes.c_long
    return func


def _call(number, *args):
    result = _syscall()(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err) if err != ENOTSUPP else "operation not supported")
    return result


def bpf(cmd, attr):
    """bpf(cmd, &attr, sizeof attr); the new fd or 0, OSError on failure."""
    return _call(SYSCALLS[platform.machine()][0], ctypes.c_long(cmd), ctypes.byref(attr),
                 ctypes.c_long(ctypes.sizeof(attr)))


def _with_memlock(call):
    """Kernels before 5.11 charge maps and programs to RLIMIT_MEMLOCK, whose
    default (64 KiB) a ring buffer alone exceeds: raise it once, as bcc does."""
    try:
        return call()
    except PermissionError:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (ValueError, OSError):
            raise PermissionError(errno.EPERM, "operation not permitted (and RLIMIT_MEMLOCK cannot be raised)")
        return call()


_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", _u32), ("key_size", _u32), ("value_size", _u32), ("max_entries", _u32),
                ("map_flags", _u32), ("inner_map_fd", _u32), ("numa_node", _u32),
                ("map_name", ctypes.c_char * OBJ_NAME_LEN)]


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", _u64), ("out_batch", _u64), ("keys", _u64), ("values", _u64),
                ("count", _u32), ("map_fd", _u32), ("elem_flags", _u64), ("flags", _u64)]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", _u32), ("insn_cnt", _u32), ("insns", _u64), ("license", _u64),
                ("log_level", _u32), ("log_size", _u32), ("log_buf", _u64), ("kern_version", _u32),
                ("prog_flags", _u32), ("prog_name", ctypes.c_char * OBJ_NAME_LEN)]


class _RawTracepointAttr(ctypes.Structure):
    _fields_ = [("name", _u64), ("prog_fd", _u32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", _u32), ("id", _u32), ("key_size", _u32), ("value_size", _u32),
                ("max_entries", _u32), ("map_flags", _u32), ("name", ctypes.c_char * OBJ_NAME_LEN)]


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info up to recursion_misses (Linux 5.12). An older
    kernel fills what it knows and accepts the zeroed rest."""

    _fields_ = [("type", _u32), ("id", _u32), ("tag", ctypes.c_uint8 * 8), ("_middle", ctypes.c_uint8 * 176),
                ("run_time_ns", _u64), ("run_cnt", _u64), ("recursion_misses", _u64)]


class _PerfEventAttr(ctypes.Structure):
    _fields_ = [("type", _u32), ("size", _u32), ("config", _u64), ("sample_period", _u64),
                ("sample_type", _u64), ("read_format", _u64), ("flags", _u64),
                ("wakeup_events", _u32), ("bp_type", _u32), ("config1", _u64)]


PERF_ATTR_DISABLED = 1  # bit 0 of the flags word


def _addr(buf):
    return ctypes.addressof(buf) if buf is not None else 0


def _info(fd, info):
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info


def map_info(fd):
    """The kernel's own description of the map behind fd: exact, whatever
    the compiler believed."""
    return _info(fd, _MapInfo())


def prog_id(fd):
    return _info(fd, _ProgInfo()).id


def prog_type(fd):
    """The kernel's type of a loaded program (BPF_PROG_TYPE_*)."""
    return _info(fd, _ProgInfo()).type


def prog_recursion_misses(fd):
    """How often the kernel skipped the program behind fd because it was
    already running on that CPU (a tracepoint hit again from an interrupt
    while the program ran): events it never saw. 0 before Linux 5.12."""
    return _info(fd, _ProgInfo()).recursion_misses


def parse_cpu_list(text):
    """How many CPUs a list such as '0-3,8' names."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


@functools.lru_cache(maxsize=1)
def possible_cpus():
    """The kernel sizes per-CPU values by the possible CPUs, not the online ones."""
    with open("/sys/devices/system/cpu/possible") as f:
        return parse_cpu_list(f.read())


# -- loaded --------------------------------------------------------------------


class Map:
    """One map, by raw bytes: keys of key_size, values of value_size (per-CPU
    maps: value_len, every possible CPU's value padded to 8 bytes)."""

    def __init__(self, spec, fd):
        self.spec = spec
        self.name = spec.name
        self.fd = fd
        self.key_size = spec.key_size
        self.value_size = spec.value_size
        self.max_entries = spec.max_entries
        self.percpu = spec.type in PERCPU_TYPES
        self.stride = (spec.value_size + 7) & ~7
        self.value_len = possible_cpus() * self.stride if self.percpu else spec.value_size

    def _key(self, key):
        # The kernel reads key_size bytes from whatever it is given: a short
        # key would hand it the bytes after it.
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: a key is {self.key_size} bytes, not {len(key)}")
        return ctypes.create_string_buffer(bytes(key), self.key_size)

    def _elem(self, cmd, key, value=None, flags=0):
        attr = _ElemAttr(map_fd=self.fd, key=_addr(key), value=_addr(value), flags=flags)
        return bpf(cmd, attr)

    def lookup(self, key):
        """The value's bytes, or None when the key is absent."""
        value = ctypes.create_string_buffer(self.value_len)
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, self._key(key), value)
        except FileNotFoundError:
            return None
        return value.raw

    def update(self, key, value, flags=BPF_ANY):
        if len(value) != self.value_len:
            raise ValueError(f"{self.name}: a value is {self.value_len} bytes, not {len(value)}")
        self._elem(BPF_MAP_UPDATE_ELEM, self._key(key), ctypes.create_string_buffer(bytes(value), self.value_len),
                   flags)

    def delete(self, key):
        """False when the key was absent."""
        try:
            self._elem(BPF_MAP_DELETE_ELEM, self._key(key))
        except FileNotFoundError:
            return False
        return True

    def __contains__(self, key):
        return self.lookup(key) is not None

    def keys(self):
        """Every key, each once. A hash map whose current key is deleted
        under us starts over from its first key: the seen set keeps keys
        from repeating and the bound on calls keeps a busy map from holding
        us forever (keys added meanwhile may then be missed)."""
        out, seen = [], set()
        key = None
        nxt = ctypes.create_string_buffer(self.key_size)
        for _ in range(2 * self.max_entries + 1):
            try:
                self._elem(BPF_MAP_GET_NEXT_KEY, key, nxt)
            except FileNotFoundError:
                break
            raw = nxt.raw
            if raw not in seen:
                seen.add(raw)
                out.append(raw)
            key = ctypes.create_string_buffer(raw, self.key_size)
        return out

    def items(self):
        """(key, value) pairs; a key deleted between listing and lookup is left out."""
        out = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                out.append((key, value))
        return out

    def values(self, key):
        """A per-CPU map's value for key, one bytes of value_size per
        possible CPU; None when absent."""
        raw = self.lookup(key)
        if raw is None:
            return None
        if not self.percpu:
            return [raw]
        return [raw[i : i + self.value_size] for i in range(0, len(raw), self.stride)]

    def sum(self, key):
        """The sum over CPUs of an unsigned value (a per-CPU counter); 0 when absent."""
        return sum(int.from_bytes(v, sys.byteorder) for v in self.values(key) or ())

    def pop_all(self, batch=True):
        """Every (key, value), each removed from the map: one batch call per
        chunk where the kernel has them (5.6+), else lookup and delete one by
        one (an update between the two is then lost, as with bcc's fallback)."""
        if batch:
            try:
                return self._pop_batch()
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP, errno.ENOSYS):
                    raise
        out = []
        for key, value in self.items():
            if self.delete(key):
                out.append((key, value))
        return out

    def _pop_batch(self):
        out = []
        chunk = min(self.max_entries, 1024)
        token_len = max(self.key_size, 8)  # hash maps page by bucket (a u32), arrays by key
        tokens = [ctypes.create_string_buffer(token_len), ctypes.create_string_buffer(token_len)]
        first = True
        while True:
            keys = ctypes.create_string_buffer(chunk * self.key_size)
            values = ctypes.create_string_buffer(chunk * self.value_len)
            attr = _BatchAttr(in_batch=0 if first else ctypes.addressof(tokens[0]),
                              out_batch=ctypes.addressof(tokens[1]), keys=ctypes.addressof(keys),
                              values=ctypes.addressof(values), count=chunk, map_fd=self.fd)
            done = False
            try:
                bpf(BPF_MAP_LOOKUP_AND_DELETE_BATCH, attr)
            except FileNotFoundError:
                done = True  # the last chunk: attr.count says how many it holds
            except OSError as e:
                if e.errno == errno.ENOSPC and chunk < self.max_entries:
                    # One hash bucket holds more than a chunk: nothing was taken.
                    chunk = min(self.max_entries, chunk * 4)
                    continue
                raise
            kraw, vraw = keys.raw, values.raw
            for i in range(attr.count):
                out.append((kraw[i * self.key_size : (i + 1) * self.key_size],
                            vraw[i * self.value_len : (i + 1) * self.value_len]))
            if done:
                return out
            first = False
            tokens.reverse()

    def clear(self):
        for key in self.keys():
            self.delete(key)

    def __repr__(self):
        return f"Map({self.name!r}, {MAP_TYPES.get(self.spec.type, self.spec.type)}, fd={self.fd})"


class Loaded:
    """A Compiled program in the kernel: maps created, functions loaded,
    attached on request. close() (or the with-block's end) closes every fd,
    which detaches and frees everything."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.maps = {}
        self.programs = {}  # function name -> program fd
        self.attached = []  # (tracepoint, function, perf event or raw tracepoint fd)
        try:
            for spec in compiled.maps:
                self.maps[spec.name] = Map(spec, self._create_map(spec))
            for prog in compiled.programs:
                self.programs[prog.name] = self._load(prog)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name):
        return self.maps[name]

    def __contains__(self, name):
        return name in self.maps

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @staticmethod
    def _create_map(spec):
        attr = _MapCreateAttr(map_type=spec.type, key_size=spec.key_size, value_size=spec.value_size,
                              max_entries=spec.max_entries, map_flags=spec.flags,
                              map_name=_obj_name(spec.name))
        try:
            return _with_memlock(lambda: bpf(BPF_MAP_CREATE, attr))
        except OSError as e:
            raise LoaderError(f"creating the BPF map {spec.name} failed ({e.strerror}).") from None

    def _load(self, prog):
        insns = ctypes.create_string_buffer(prog.insns, len(prog.insns))
        for index, name in prog.relocs:
            struct.pack_into("<i", insns, index * INSN_SIZE + 4, self.maps[name].fd)
        license = ctypes.create_string_buffer(self.compiled.license.encode())

        def load(log=None):
            attr = _ProgLoadAttr(prog_type=prog.prog_type, insn_cnt=len(prog.insns) // INSN_SIZE,
                                 insns=ctypes.addressof(insns), license=ctypes.addressof(license),
                                 kern_version=self.compiled.kern_version, prog_name=_obj_name(prog.name))
            if log is not None:
                attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
            return _with_memlock(lambda: bpf(BPF_PROG_LOAD, attr))

        try:
            return load()
        except OSError as first:
            failure = first
        # Again with a log, only now: asking for one makes the verifier
        # slower and a full buffer alone fails the load (ENOSPC).
        log = None
        for size in LOG_SIZES:
            log = ctypes.create_string_buffer(size)
            try:
                fd = load(log)
            except OSError as e:
                failure = e
                if e.errno == errno.ENOSPC:
                    continue
                break
            return fd  # a transient failure the second time did not repeat
        text = log.value.decode(errors="replace") if log is not None else ""
        tail = "\n".join(text.strip().splitlines()[-VERIFIER_LOG_TAIL:])
        if not tail:  # refused before the verifier ran: privileges, limits, a bad attribute
            raise LoaderError(f"loading the BPF program {prog.name} failed ({failure.strerror}).") from None
        raise VerifierError(
            f"the kernel's verifier refused the BPF program {prog.name} ({failure.strerror}); its log ends:\n{tail}",
            text,
        ) from None

    def attach_tracepoint(self, tracefs_root, tracepoint, function):
        """Run function at tracepoint ('category:name'). The perf event is
        opened on CPU 0 for any task, but a program attached to a tracepoint
        runs wherever the tracepoint fires, on every CPU."""
        category, _, name = tracepoint.partition(":")
        if not category or not name or "/" in tracepoint or ".." in tracepoint:
            raise ValueError(f"not a tracepoint name: {tracepoint!r}")
        prog_fd = self.programs[function]
        try:
            with open(os.path.join(tracefs_root, "events", category, name, "id")) as f:
                tp_id = int(f.read())
        except (OSError, ValueError) as e:
            raise LoaderError(f"the tracepoint {tracepoint} has no readable id in {tracefs_root} ({e}).") from None
        attr = _PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=ctypes.sizeof(_PerfEventAttr), config=tp_id,
                              sample_period=1, wakeup_events=1, flags=PERF_ATTR_DISABLED)
        try:
            pfd = _call(SYSCALLS[platform.machine()][1], ctypes.byref(attr), ctypes.c_long(-1), ctypes.c_long(0),
                        ctypes.c_long(-1), ctypes.c_long(PERF_FLAG_FD_CLOEXEC))
        except OSError as e:
            raise LoaderError(f"opening a perf event for {tracepoint} failed ({e.strerror}).") from None
        try:
            fcntl.ioctl(pfd, PERF_EVENT_IOC_SET_BPF, prog_fd)
            fcntl.ioctl(pfd, PERF_EVENT_IOC_ENABLE, 0)
        except OSError as e:
            os.close(pfd)
            raise LoaderError(f"attaching {function} to {tracepoint} failed ({e.strerror}).") from None
        self.attached.append((tracepoint, function, pfd))

    def attach_raw_tracepoint(self, tracepoint, function):
        """Run function, a raw tracepoint program, at tracepoint
        ('category:name'; the kernel knows raw tracepoints by name alone).
        The fd the kernel returns holds the attachment."""
        category, _, name = tracepoint.partition(":")
        if not category or not name or "/" in tracepoint:
            raise ValueError(f"not a tracepoint name: {tracepoint!r}")
        event = ctypes.create_string_buffer(name.encode())
        attr = _RawTracepointAttr(name=ctypes.addressof(event), prog_fd=self.programs[function])
        try:
            fd = bpf(BPF_RAW_TRACEPOINT_OPEN, attr)
        except OSError as e:
            raise LoaderError(f"attaching {function} to the raw tracepoint {name} failed ({e.strerror}).") from None
        self.attached.append((tracepoint, function, fd))

    def prog_ids(self):
        """Function name -> the kernel's program id (what bpftool shows)."""
        return {name: prog_id(fd) for name, fd in self.programs.items()}

    def map_ids(self):
        return {name: map_info(m.fd).id for name, m in self.maps.items()}

    def close(self):
        # The attachments first, so tracing stops at once; the kernel frees
        # each program and map when its last reference goes, in any order.
        for _tp, _fn, pfd in self.attached:
            _close(pfd)
        self.attached = []
        for fd in self.programs.values():
            _close(fd)
        self.programs = {}
        for m in self.maps.values():
            _close(m.fd)
            m.fd = -1
        self.maps = {}


def _close(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def _obj_name(name):
    """The kernel's object name: up to 15 of [A-Za-z0-9_.], else none at all
    (a bad name fails the whole call)."""
    short = name[: OBJ_NAME_LEN - 1]
    return short.encode() if re.fullmatch(r"[A-Za-z0-9_.]*", short) else b""
