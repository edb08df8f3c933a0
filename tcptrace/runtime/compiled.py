"""What a compiled program is, kept apart from bcc: each function's
bytecode with its map references as relocations by map name, the maps it
names, the license. And the cache of such programs, keyed by everything the
bytecode depends on.

bcc puts each map's fd into the bytecode as it compiles (ld_imm64 with
src_reg BPF_PSEUDO_MAP_FD and imm = the fd): relocations() turns those into
references by map name, and bpfsys.Loaded writes the new maps' fds back in.
Only what tcptrace's programs use is supported: tracepoint and raw
tracepoint programs; hash,
LRU hash, array, their per-CPU kinds and the ring buffer.
"""

import binascii
import json
import os
import platform
import re
import struct
import sys
from dataclasses import dataclass, field

from .. import btf
from ..digest import sha256
from ..errors import CacheError, Unsupported

FORMAT = 2  # of Compiled's JSON; a change of shape must change it (it is in the cache key)

BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
PROG_TYPES = (BPF_PROG_TYPE_TRACEPOINT, BPF_PROG_TYPE_RAW_TRACEPOINT)

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
MAP_TYPES = {
    BPF_MAP_TYPE_HASH: "hash",
    BPF_MAP_TYPE_ARRAY: "array",
    BPF_MAP_TYPE_PERCPU_HASH: "percpu_hash",
    BPF_MAP_TYPE_PERCPU_ARRAY: "percpu_array",
    BPF_MAP_TYPE_LRU_HASH: "lru_hash",
    BPF_MAP_TYPE_LRU_PERCPU_HASH: "lru_percpu_hash",
    BPF_MAP_TYPE_RINGBUF: "ringbuf",
}
PERCPU_TYPES = (BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH)

INSN_SIZE = 8
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two slots, the second with opcode 0
CALL = 0x85
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_CALL = 1  # a call to a function in the same instructions: relative, needs nothing
_INSN = struct.Struct("<BBhi")

# -- what is kept --------------------------------------------------------------



def _b64decode(text):
    """base64, strictly: binascii's own (the base64 module takes longer to
    import than decoding every program of a run)."""
    if not isinstance(text, str):
        raise TypeError(f"{type(text).__name__}, not base64 text")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except TypeError:  # strict_mode is Python 3.11+
        import base64

        return base64.b64decode(text, validate=True)

@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


@dataclass(frozen=True)
class ProgSpec:
    name: str
    insns: bytes  # the map fds zeroed: the same program gives the same bytes
    relocs: tuple = ()  # (instruction index, map name)
    prog_type: int = BPF_PROG_TYPE_TRACEPOINT  # or BPF_PROG_TYPE_RAW_TRACEPOINT


@dataclass
class Compiled:
    maps: list
    programs: list
    license: str = "GPL"
    kern_version: int = 0
    origin: dict = field(default_factory=dict)  # bcc version, kernel, machine: for people, not checked

    def program(self, name):
        for prog in self.programs:
            if prog.name == name:
                return prog
        raise KeyError(name)

    def to_json(self):
        return json.dumps(
            {
                "format": FORMAT,
                "license": self.license,
                "kern_version": self.kern_version,
                "origin": self.origin,
                "maps": [
                    {"name": m.name, "type": m.type, "key_size": m.key_size, "value_size": m.value_size,
                     "max_entries": m.max_entries, "flags": m.flags}
                    for m in self.maps
                ],
                "programs": [
                    {"name": p.name, "insns": binascii.b2a_base64(p.insns, newline=False).decode(),
                     "relocs": [[i, name] for i, name in p.relocs], "prog_type": p.prog_type}
                    for p in self.programs
                ],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text):
        """The inverse of to_json(); ValueError for anything malformed, so a
        damaged cache never reaches the kernel half-read."""
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, not {FORMAT}")
            maps = [
                MapSpec(str(m["name"]), int(m["type"]), int(m["key_size"]), int(m["value_size"]),
                        int(m["max_entries"]), int(m["flags"]))
                for m in doc["maps"]
            ]
            programs = [
                ProgSpec(str(p["name"]), _b64decode(p["insns"]),
                         tuple((int(i), str(name)) for i, name in p["relocs"]), int(p["prog_type"]))
                for p in doc["programs"]
            ]
            compiled = cls(maps, programs, str(doc["license"]), int(doc["kern_version"]),
                           dict(doc.get("origin") or {}))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, binascii.Error) as e:
            raise ValueError(f"not a saved program ({e.__class__.__name__}: {e})") from None
        compiled.check()
        return compiled

    def check(self):
        names = [m.name for m in self.maps]
        if len(set(names)) != len(names):
            raise ValueError("two maps share a name")
        for m in self.maps:
            if m.type not in MAP_TYPES:
                raise ValueError(f"map {m.name} has type {m.type}, which this loader does not create")
        for prog in self.programs:
            if prog.prog_type not in PROG_TYPES:
                raise ValueError(f"{prog.name} is of program type {prog.prog_type}, which this loader does not load")
            count = len(prog.insns) // INSN_SIZE
            if not prog.insns or len(prog.insns) % INSN_SIZE:
                raise ValueError(f"{prog.name}: {len(prog.insns)} bytes is not a whole number of instructions")
            for index, name in prog.relocs:
                if name not in names:
                    raise ValueError(f"{prog.name} refers to map {name}, which is not kept")
                if not 0 <= index < count - 1:
                    raise ValueError(f"{prog.name}: relocation at {index} is outside the program")
                op, regs, _off, _imm = _INSN.unpack_from(prog.insns, index * INSN_SIZE)
                if op != LD_IMM64 or regs >> 4 != BPF_PSEUDO_MAP_FD:
                    raise ValueError(f"{prog.name}: relocation at {index} is not a map load")


def relocations(insns, fd_names):
    """(the instructions with every map fd zeroed, ((index, map name), ...)).

    fd_names maps each of the compiling process's map fds to its name. A map
    reference by anything but fd (a map value, an index into fd_array), a
    kfunc call or an unknown fd is refused: those would need more than an fd
    written back."""
    if len(insns) % INSN_SIZE:
        raise Unsupported(f"{len(insns)} bytes is not a whole number of BPF instructions")
    out = bytearray(insns)
    relocs = []
    count = len(insns) // INSN_SIZE
    index = 0
    while index < count:
        op, regs, off, imm = _INSN.unpack_from(insns, index * INSN_SIZE)
        src = regs >> 4
        if op == LD_IMM64:
            if index + 1 >= count:
                raise Unsupported(f"a 64-bit load at {index} has no second half")
            if src == BPF_PSEUDO_MAP_FD:
                if imm not in fd_names:
                    raise Unsupported(f"instruction {index} refers to fd {imm}, which is none of the maps")
                relocs.append((index, fd_names[imm]))
                _INSN.pack_into(out, index * INSN_SIZE, op, regs, off, 0)
            elif src != 0:
                raise Unsupported(f"instruction {index} is a 64-bit load of kind {src}, which needs more than a map fd")
            index += 2
            continue
        if op == CALL and src not in (0, BPF_PSEUDO_CALL):
            raise Unsupported(f"instruction {index} calls a kernel function by BTF id")
        index += 1
    return bytes(out), tuple(relocs)


# -- the cache -----------------------------------------------------------------


def cache_key(text, release, bcc_version, uname_version=None, machine=None):
    """What the bytecode depends on: the program text (every option and
    offset is in it), the kernel it was built for and runs on, bcc, and
    this file's format."""
    parts = (
        f"tcptrace-loader {FORMAT}",
        release,
        uname_version if uname_version is not None else os.uname().version,
        machine or platform.machine(),
        bcc_version,
        text,
    )
    digest = sha256()
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "little"))  # no two splits of one string collide
        digest.update(data)
    return digest.hexdigest()


def cache_path(text, release, bcc_version, directory=None, uname_version=None):
    return os.path.join(directory or btf.cache_dir(),
                        f"prog-{cache_key(text, release, bcc_version, uname_version)[:40]}.json")


# The cache holds code this process loads into the kernel: the same owner
# and mode rules as the BTF offsets (btf.trusted).
trusted = btf.trusted


def read_cache(path):
    """The Compiled saved at path; None when there is none; CacheError when
    there is one that must not be used."""
    data = btf.read_cached(path, "cached program")
    if data is None:
        return None
    try:
        return Compiled.from_json(data.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"the cached program {path} is damaged ({e}).") from None


def write_cache(path, compiled):
    """Save compiled at path, whole or not at all; False when it cannot be
    written (a read-only cache only costs start-up time)."""
    return btf.write_cached(path, compiled.to_json().encode(), prefix=".prog-")


_VERSION_RE = re.compile(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", re.M)


def bcc_version(templates=()):
    """bcc's version as its Python module states it, read from its
    version.py without importing it (importing bcc loads libbcc and LLVM:
    what the cached path avoids). Searched where find_bcc() would find it:
    sys.path first, then the templates ('{v}' is the Python version).
    None when bcc is not installed."""
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    for base in list(sys.path) + [t.format(v=v) for t in templates]:
        init = os.path.join(base or ".", "bcc", "__init__.py")
        if not os.path.isfile(init):
            continue
        try:
            with open(os.path.join(base or ".", "bcc", "version.py")) as f:
                found = _VERSION_RE.search(f.read())
        except OSError:
            found = None
        if found:
            return found.group(1)
    return None
