"""Struct member offsets from the running kernel's BTF.

Byte counters live in struct tcp_sock, whose layout changes with every
kernel and config. Reading them at offsets taken from kernel headers of
another build is how tcplife prints garbage; the kernel's own BTF
(/sys/kernel/btf/vmlinux, format in Documentation/bpf/btf.rst) is the
layout of the running kernel. This is a small pure-Python reader of that
format: it needs no libbpf, bpftool or headers.
"""

import json
import os
import stat
import struct

from .digest import sha256

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION = 1, 2, 3, 4, 5
KIND_ENUM, KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST = 6, 7, 8, 9, 10
KIND_RESTRICT, KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC = 11, 12, 13, 14, 15
KIND_FLOAT, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 16, 17, 18, 19

# Bytes that follow the 12-byte common header: (fixed, per vlen item).
_TRAILER = {
    KIND_INT: (4, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BTFError(ValueError):
    pass


class BTF:
    """Types of one BTF blob, indexed lazily: only the offset of each type
    record is kept, decoding happens on demand."""

    def __init__(self, data):
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BTFError("not a BTF blob (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self.data = data
        self.types_start = hdr_len + type_off
        self.types_end = self.types_start + type_len
        self.strings_start = hdr_len + str_off
        self.strings_end = self.strings_start + str_len
        if self.types_end > len(data) or self.strings_end > len(data):
            raise BTFError("BTF sections run past the end of the blob")
        self.records = [0]  # type id -> record offset; id 0 is void
        unpack = struct.Struct("<III").unpack_from
        pos = self.types_start
        end = self.types_end
        records = self.records
        while pos < end:
            records.append(pos)
            _name, info, _st = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            fixed, per = _TRAILER.get(kind, (0, 0))
            pos += 12 + fixed + per * (info & 0xFFFF)
        if pos != end:
            raise BTFError("BTF type section is malformed")

    def string(self, offset):
        start = self.strings_start + offset
        end = self.data.index(b"\0", start, self.strings_end)
        return self.data[start:end].decode()

    def _header(self, type_id):
        name_off, info, size_or_type = struct.unpack_from("<III", self.data, self.records[type_id])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31), size_or_type

    def find(self, name, kind):
        """Type ids of the named types of one kind (there may be several)."""
        wanted = name.encode()
        ids = []
        for type_id in range(1, len(self.records)):
            name_off, k, _vlen, _kf, _st = self._header(type_id)
            if k == kind and name_off and self._name_equals(name_off, wanted):
                ids.append(type_id)
        return ids

    def _name_equals(self, offset, wanted):
        start = self.strings_start + offset
        return self.data[start:start + len(wanted) + 1] == wanted + b"\0"

    def members(self, type_id):
        """(name, type id, bit offset, bitfield size) of a struct or union."""
        _n, kind, vlen, kind_flag, _size = self._header(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise BTFError(f"type {type_id} is not a struct or union")
        pos = self.records[type_id] + 12
        out = []
        for _ in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self.data, pos)
            bits = 0
            if kind_flag:
                bits, offset = offset >> 24, offset & 0xFFFFFF
            out.append((self.string(name_off) if name_off else "", mtype, offset, bits))
            pos += 12
        return out

    def resolve(self, type_id):
        """Skip typedefs and qualifiers."""
        while True:
            _n, kind, _v, _kf, target = self._header(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = target

    def size(self, type_id):
        type_id = self.resolve(type_id)
        _n, kind, _v, _kf, size_or_type = self._header(type_id)
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return size_or_type
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", self.data, self.records[type_id] + 12)
            return self.size(elem) * nelems
        raise BTFError(f"type {type_id} has no size")

    def member_offset(self, struct_id, name):
        """(byte offset, size) of a member, looking inside anonymous members."""
        for mname, mtype, bit_offset, bits in self.members(struct_id):
            if mname == name:
                if bits or bit_offset % 8:
                    raise BTFError(f"member {name} is a bitfield")
                return bit_offset // 8, self.size(mtype)
            if not mname:
                inner = self.resolve(mtype)
                if self._header(inner)[1] in (KIND_STRUCT, KIND_UNION):
                    found = self.member_offset(inner, name)
                    if found:
                        return bit_offset // 8 + found[0], found[1]
        return None


    def params(self, type_id):
        """The parameter type ids of a function prototype, through typedefs
        and a pointer (a tracepoint's btf_trace_<event> typedef is a pointer
        to one); None for anything else."""
        type_id = self.resolve(type_id)
        if self._header(type_id)[1] == KIND_PTR:
            type_id = self.resolve(self._header(type_id)[4])
        _n, kind, vlen, _kf, _ret = self._header(type_id)
        if kind != KIND_FUNC_PROTO:
            return None
        pos = self.records[type_id] + 12
        return [struct.unpack_from("<II", self.data, pos + 8 * i)[1] for i in range(vlen)]

    def is_pointer_to(self, type_id, struct_name):
        type_id = self.resolve(type_id)
        if self._header(type_id)[1] != KIND_PTR:
            return False
        name_off, kind, _v, _kf, _size = self._header(self.resolve(self._header(type_id)[4]))
        return kind == KIND_STRUCT and name_off != 0 and self.string(name_off) == struct_name

    def is_integer(self, type_id, size):
        """An int or enum of this many bytes (a tracepoint's state or reason)."""
        type_id = self.resolve(type_id)
        _n, kind, _v, _kf, size_or_type = self._header(type_id)
        return kind in (KIND_INT, KIND_ENUM, KIND_ENUM64) and size_or_type == size


# A tracepoint's arguments as a raw tracepoint program gets them: one u64
# each in its context, in the order of the tracepoint's prototype. A tool
# asks for them as the members of "btf_trace_<event>" (the kernel's typedef
# of the prototype); these are the prototypes tcptrace takes raw, each
# argument's name and type: "struct NAME" a pointer to it, "intN" an N-bit
# int or enum. BTF keeps the types, not the names: the kernel's prototype
# must start with exactly these types, or no argument is taken.
TRACE_PREFIX = "btf_trace_"
PROTOTYPES = {
    "btf_trace_inet_sock_set_state": (("sk", "struct sock"), ("oldstate", "int32"), ("newstate", "int32")),
}


def tracepoint_args(btf, typedef_name, members):
    """{name: (offset in the raw tracepoint's context, 8)} for the asked
    arguments of a tracepoint in PROTOTYPES, where the kernel's prototype
    matches; {} otherwise."""
    proto = PROTOTYPES[typedef_name]
    ids = btf.find(typedef_name, KIND_TYPEDEF)
    params = btf.params(ids[0]) if ids else None
    if not params or len(params) < len(proto) + 1:  # the first is the tracepoint's own data
        return {}
    for (name, ctype), param in zip(proto, params[1:]):
        if ctype.startswith("struct "):
            ok = btf.is_pointer_to(param, ctype[len("struct "):])
        else:
            ok = btf.is_integer(param, int(ctype[len("int"):]) // 8)
        if not ok:
            return {}
    return {name: (index * 8, 8) for index, (name, _ctype) in enumerate(proto) if name in members}


def struct_offsets(btf, struct_name, members):
    """{member: (offset, size)} for the members the struct has; a member the
    kernel lacks, or has as a bitfield, is left out, so callers can say which
    column is unavailable. A "btf_trace_<event>" name asks for a
    tracepoint's arguments instead (tracepoint_args)."""
    if struct_name.startswith(TRACE_PREFIX):
        return tracepoint_args(btf, struct_name, members)
    ids = [i for i in btf.find(struct_name, KIND_STRUCT) if btf.members(i)]
    if not ids:
        return {}
    found = {}
    for member in members:
        try:
            where = btf.member_offset(ids[0], member)
        except BTFError:  # a bitfield: no byte offset to read it at
            continue
        if where:
            found[member] = where
    return found


def _cache_key(path):
    st = os.stat(path)
    uname = os.uname()
    raw = f"{uname.release}|{uname.version}|{st.st_size}|{st.st_mtime_ns}|{path}"
    return sha256(raw.encode()).hexdigest()[:16]


# -- the cache: compiled programs (runtime/compiled.py) and BTF offsets ---------------


def cache_dir(env=None, euid=None):
    """Where compiled programs and BTF offsets are kept: $TCPTRACE_CACHE_DIR;
    else systemd's CacheDirectory= ($CACHE_DIRECTORY); else /var/cache/tcptrace
    for root; else $XDG_CACHE_HOME/tcptrace or ~/.cache/tcptrace, when that
    directory is this user's; else /var/tmp/tcptrace-UID.

    The home directory must be this user's own: setpriv and su keep root's
    $HOME, and a user with CAP_DAC_READ_SEARCH could read root's cache but
    never write it."""
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    if env.get("TCPTRACE_CACHE_DIR"):
        return env["TCPTRACE_CACHE_DIR"]
    systemd = env.get("CACHE_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    if euid == 0:
        return "/var/cache/tcptrace"
    xdg = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg) and _owned_by(xdg, euid):
        return os.path.join(xdg, "tcptrace")
    for home in (env.get("HOME", ""), _passwd_home(euid)):
        if home and os.path.isabs(home) and _owned_by(home, euid):
            return os.path.join(home, ".cache", "tcptrace")
    # /var/tmp outlives a reboot, as a cache keyed by kernel build should.
    # Made here, private: a directory there that another user made first is
    # refused when read, and written to never.
    path = f"/var/tmp/tcptrace-{euid}"
    if euid == os.geteuid():
        try:
            os.mkdir(path, 0o700)
        except OSError:
            pass
    return path


def _owned_by(path, uid):
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid


def _passwd_home(uid):
    import pwd

    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return ""


def trusted(st, euid=None, directory=False):
    """Why a cache file (or its directory) with this stat may not be trusted, or None.

    The cache holds what this process loads into the kernel with its
    privileges (programs, and the offsets they read memory at): only root or
    this user may own it, and nobody else may write it. A directory others
    may write into is fine only with the sticky bit (as /tmp): nobody can
    then replace a file they do not own."""
    euid = os.geteuid() if euid is None else euid
    if st.st_uid not in (0, euid):
        return f"it is owned by uid {st.st_uid}"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if directory:
        if not stat.S_ISDIR(st.st_mode):
            return "it is not a directory"
        if writable and not st.st_mode & stat.S_ISVTX:
            return "others may write into it"
        return None
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if writable:
        return "others may write it"
    return None


def read_cached(path, what):
    """The bytes of a cache file; None when there is none; CacheError when
    there is one that must not be used. `what` names it in the error."""
    from .errors import CacheError

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"the {what} {path} cannot be opened ({e.strerror}).") from None
    try:
        # fstat of the opened file: what is checked is what is read.
        why = trusted(os.fstat(fd)) or trusted(os.stat(os.path.dirname(path) or "."), directory=True)
        if why:
            raise CacheError(f"the {what} {path} is not used: {why}.")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def write_cached(path, data, prefix=".tmp-"):
    """Save data at path, whole or not at all, readable by this user alone;
    False when it cannot be (a read-only cache only costs start-up time)."""
    import tempfile  # here: only a miss writes, and tempfile imports random and shutil

    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if trusted(os.stat(directory), directory=True):
            return False  # it would be refused when read
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)  # mode 0600
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def kernel_offsets(struct_name, members, path=VMLINUX, cache=True):
    """Member offsets in the running kernel, cached per kernel build.

    Returns None when the kernel has no BTF: callers then mark the columns
    that need it as unavailable rather than guess. A cached file that another
    user could have written is not used: the programs read kernel memory at
    these offsets."""
    from .errors import CacheError

    if not os.path.exists(path):
        return None
    key = f"{_cache_key(path)}-{struct_name}-{'-'.join(sorted(members))}"
    cache_file = os.path.join(cache_dir(), f"btf-{sha256(key.encode()).hexdigest()[:24]}.json")
    if cache:
        try:
            data = read_cached(cache_file, "cached BTF offsets")
            if data is not None:
                return {k: (int(v[0]), int(v[1])) for k, v in json.loads(data).items()}
        except (CacheError, ValueError, TypeError, AttributeError, IndexError):
            pass  # found again from BTF below, and the file replaced if it may be
    with open(path, "rb") as f:
        found = struct_offsets(BTF(f.read()), struct_name, members)
    if cache:
        write_cached(cache_file, json.dumps(found).encode(), prefix=".btf-")
    return found
