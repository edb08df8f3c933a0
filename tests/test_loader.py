"""The bcc-free loader and the ring buffer reader, without root or bcc: the
saved form, relocations, the cache and its refusals, the ring's record walk."""

import ctypes
import mmap
import os
import stat
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from tcptrace.errors import CacheError, Unsupported
from tcptrace.runtime import bpfsys, compiled, ringbuf
from tcptrace.runtime.compiled import (
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_RINGBUF,
    Compiled,
    MapSpec,
    ProgSpec,
)

INSN = struct.Struct("<BBhi")


def insn(op, dst=0, src=0, off=0, imm=0):
    return INSN.pack(op, (src << 4) | dst, off, imm)


def ld_map(dst, fd):
    return insn(0x18, dst, 1, imm=fd) + insn(0)


def ld_const(dst, value):
    return insn(0x18, dst, 0, imm=value & 0xFFFFFFFF) + insn(0, imm=value >> 32)


MOV0 = insn(0xB7)  # r0 = 0
CALL_LOOKUP = insn(0x85, imm=1)  # bpf_map_lookup_elem
EXIT = insn(0x95)


def sample():
    insns, relocs = compiled.relocations(
        MOV0 + ld_map(1, 7) + CALL_LOOKUP + ld_map(1, 9) + MOV0 + EXIT, {7: "stats", 9: "events"}
    )
    return Compiled(
        maps=[MapSpec("stats", BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 2),
              MapSpec("events", BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 21),
              MapSpec("filter_lports", BPF_MAP_TYPE_HASH, 2, 1, 64)],
        programs=[ProgSpec("on_inet_sock_set_state", insns, relocs, compiled.BPF_PROG_TYPE_RAW_TRACEPOINT),
                  ProgSpec("on_kfree_skb", MOV0 + EXIT)],
        license="GPL",
        kern_version=397868,
        origin={"bcc": "0.26.0"},
    )


def test_json_round_trip():
    kept = sample()
    text = kept.to_json()
    assert Compiled.from_json(text) == kept
    assert Compiled.from_json(text).to_json() == text
    assert [p.prog_type for p in Compiled.from_json(text).programs] == [
        compiled.BPF_PROG_TYPE_RAW_TRACEPOINT, compiled.BPF_PROG_TYPE_TRACEPOINT]


def _edit(doc_edit):
    import json

    doc = json.loads(sample().to_json())
    doc_edit(doc)
    return json.dumps(doc)


DAMAGED = {
    "another format": lambda d: d.update(format=compiled.FORMAT + 1),
    "a relocation to a map not kept": lambda d: d["programs"][0].update(relocs=[[1, "nothing"]]),
    "a relocation past the end": lambda d: d["programs"][0].update(relocs=[[99, "stats"]]),
    "a relocation on a plain instruction": lambda d: d["programs"][0].update(relocs=[[0, "stats"]]),
    "a partial instruction": lambda d: d["programs"][0].update(insns="AAAA"),
    "a map type not created": lambda d: d["maps"][0].update(type=12),
    "two maps of one name": lambda d: d["maps"].append(dict(d["maps"][0])),
    "bad base64": lambda d: d["programs"][0].update(insns="!!"),
    "a missing field": lambda d: d["maps"][0].pop("key_size"),
    "a program type not loaded": lambda d: d["programs"][0].update(prog_type=26),  # BPF_PROG_TYPE_TRACING
    "a program without a type": lambda d: d["programs"][0].pop("prog_type"),
}


@pytest.mark.parametrize("edit", DAMAGED.values(), ids=list(DAMAGED))
def test_from_json_refuses_what_it_cannot_load(edit):
    with pytest.raises(ValueError):
        Compiled.from_json(_edit(edit))


def test_from_json_refuses_non_json():
    with pytest.raises(ValueError):
        Compiled.from_json("{not json")


def test_relocations_name_each_map_load_and_zero_its_fd():
    code = MOV0 + ld_map(1, 7) + CALL_LOOKUP + ld_const(2, 7) + ld_map(3, 9) + ld_map(1, 7) + EXIT
    clean, relocs = compiled.relocations(code, {7: "a", 9: "b"})
    # ld_const(2, 7) carries the number 7, not a map: only src_reg says so.
    assert relocs == ((1, "a"), (6, "b"), (8, "a"))
    assert len(clean) == len(code)
    for index in range(len(code) // 8):
        op, regs, off, imm = INSN.unpack_from(clean, index * 8)
        if index in (1, 6, 8):
            assert (op, regs, imm) == (0x18, (1 << 4) | INSN.unpack_from(code, index * 8)[1] & 0xF, 0)
        else:
            assert clean[index * 8 : index * 8 + 8] == code[index * 8 : index * 8 + 8]


REFUSED = {
    "an fd of no map": MOV0 + ld_map(1, 8) + EXIT,
    "a map value load": insn(0x18, 1, 2, imm=7) + insn(0) + EXIT,
    "a map index load": insn(0x18, 1, 5, imm=0) + insn(0) + EXIT,
    "a kfunc call": insn(0x85, src=2, imm=1234) + EXIT,
    "a load without its second half": MOV0 + insn(0x18, 1, 1, imm=7),
    "a partial instruction": MOV0 + b"\x95\x00\x00",
}


@pytest.mark.parametrize("code", REFUSED.values(), ids=list(REFUSED))
def test_relocations_refuse_what_an_fd_cannot_fix(code):
    with pytest.raises(Unsupported):
        compiled.relocations(code, {7: "a"})


def test_relocations_keep_bpf_to_bpf_calls():
    code = insn(0x85, src=1, imm=1) + EXIT + MOV0 + EXIT
    assert compiled.relocations(code, {}) == (code, ())


BASE = dict(text="int x;", release="6.18.44", bcc_version="0.26.0", uname_version="#1 SMP", machine="x86_64")


def test_cache_key_changes_with_each_input():
    keys = {"base": compiled.cache_key(**BASE)}
    for name, other in [("text", "int y;"), ("release", "6.18.45"), ("bcc_version", "0.29.1"),
                        ("uname_version", "#2 SMP"), ("machine", "aarch64")]:
        keys[name] = compiled.cache_key(**dict(BASE, **{name: other}))
    assert len(set(keys.values())) == len(keys), keys
    assert compiled.cache_key(**BASE) == keys["base"]
    # The parts are length-prefixed: moving a boundary changes the key.
    assert compiled.cache_key(**dict(BASE, text="6.18.44int x;", release="")) != keys["base"]


def test_cache_path_is_under_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TCPTRACE_CACHE_DIR", str(tmp_path))
    path = compiled.cache_path("int x;", "6.18.44", "0.26.0")
    assert os.path.dirname(path) == str(tmp_path)
    assert path == compiled.cache_path("int x;", "6.18.44", "0.26.0")
    assert path != compiled.cache_path("int x;", "6.18.44", "0.27.0")


def test_cache_round_trip_is_private(tmp_path):
    path = str(tmp_path / "cache" / "prog.json")
    assert compiled.read_cache(path) is None
    assert compiled.write_cache(path, sample())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    assert os.listdir(tmp_path / "cache") == ["prog.json"]  # no temporary file left
    assert compiled.read_cache(path) == sample()


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o620], ids=["world", "other", "group"])
def test_cache_file_others_may_write_is_refused(tmp_path, mode):
    path = str(tmp_path / "prog.json")
    compiled.write_cache(path, sample())
    os.chmod(path, mode)
    with pytest.raises(CacheError, match="others may write it"):
        compiled.read_cache(path)


def test_cache_in_a_directory_others_may_write_is_refused(tmp_path):
    path = str(tmp_path / "d" / "prog.json")
    compiled.write_cache(path, sample())
    os.chmod(tmp_path / "d", 0o777)
    with pytest.raises(CacheError, match="others may write into it"):
        compiled.read_cache(path)
    assert not compiled.write_cache(path, sample())
    os.chmod(tmp_path / "d", 0o1777)  # sticky, as /tmp: nobody else can replace our file
    assert compiled.read_cache(path) == sample()


def test_cache_symlink_is_refused(tmp_path):
    real = str(tmp_path / "real.json")
    compiled.write_cache(real, sample())
    os.symlink(real, tmp_path / "prog.json")
    with pytest.raises(CacheError, match="cannot be opened"):
        compiled.read_cache(str(tmp_path / "prog.json"))


def test_damaged_cache_is_an_error(tmp_path):
    path = tmp_path / "prog.json"
    path.write_text(sample().to_json()[:-20])
    os.chmod(path, 0o600)
    with pytest.raises(CacheError, match="damaged"):
        compiled.read_cache(str(path))


class Stat:
    def __init__(self, uid, mode):
        self.st_uid, self.st_mode = uid, mode


@pytest.mark.parametrize(
    "uid, mode, euid, directory, refused",
    [
        (0, stat.S_IFREG | 0o600, 0, False, None),
        (1000, stat.S_IFREG | 0o600, 1000, False, None),
        (0, stat.S_IFREG | 0o644, 1000, False, None),  # root's file, for a user: fine
        (1000, stat.S_IFREG | 0o600, 0, False, "owned by uid 1000"),  # a user's file, for root: never
        (1001, stat.S_IFREG | 0o600, 1000, False, "owned by uid 1001"),
        (0, stat.S_IFREG | 0o602, 0, False, "others may write it"),
        (0, stat.S_IFDIR | 0o700, 0, False, "not a regular file"),
        (0, stat.S_IFDIR | 0o755, 0, True, None),
        (0, stat.S_IFDIR | 0o775, 0, True, "others may write into it"),
        (0, stat.S_IFDIR | 0o1777, 0, True, None),
        (1000, stat.S_IFDIR | 0o700, 0, True, "owned by uid 1000"),
    ],
)
def test_trusted(uid, mode, euid, directory, refused):
    why = compiled.trusted(Stat(uid, mode), euid=euid, directory=directory)
    if refused is None:
        assert why is None
    else:
        assert refused in why


def test_bcc_version_is_read_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "lib" / "bcc"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "version.py").write_text("__version__ = '9.8.7'\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "nothing")])
    assert compiled.bcc_version() is None
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    (tmp_path / f"py{v}").symlink_to(tmp_path / "lib")
    assert compiled.bcc_version([str(tmp_path / "py{v}")]) == "9.8.7"
    monkeypatch.setattr(sys, "path", [str(tmp_path / "lib")])
    assert compiled.bcc_version() == "9.8.7"
    assert "bcc" not in sys.modules or sys.modules["bcc"].__file__ != str(pkg / "__init__.py")


@pytest.mark.parametrize("text, count", [("0", 1), ("0-1\n", 2), ("0-3,8-11", 8), ("0,2,4-5", 4)])
def test_parse_cpu_list(text, count):
    assert bpfsys.parse_cpu_list(text) == count


@pytest.mark.parametrize("key, value", [(b"\x01", b"\x01"), (b"\x01\x02\x03", b"\x01"), (b"\x01\x02", b"")])
def test_map_refuses_wrong_sizes_before_the_kernel_sees_them(key, value):
    m = bpfsys.Map(MapSpec("filter_lports", BPF_MAP_TYPE_HASH, 2, 1, 64), fd=-1)
    with pytest.raises(ValueError):
        m.update(key, value)


def test_percpu_value_length():
    m = bpfsys.Map(MapSpec("s", BPF_MAP_TYPE_PERCPU_ARRAY, 4, 12, 2), fd=-1)
    assert (m.stride, m.value_len) == (16, 16 * bpfsys.possible_cpus())


def test_obj_name():
    assert bpfsys._obj_name("on_inet_sock_set_state") == b"on_inet_sock_se"
    assert bpfsys._obj_name("a-b") == b""  # the kernel would refuse the whole call


def test_neither_module_imports_bcc():
    code = "import sys, tcptrace.runtime.bpfsys, tcptrace.runtime.compiled, tcptrace.runtime.ringbuf; print(sorted(m for m in sys.modules if m.split('.')[0] == 'bcc'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the ring buffer's record walk, on a memfd laid out as the kernel maps a ring --

PAGE = mmap.PAGESIZE
RING = 2 * PAGE


class FakeRing:
    """Consumer page, producer page, then the data; where the kernel would
    show the data a second time, bytes that are not the data, so a reader
    that let a wrapping record run on into that copy would read junk."""

    def __init__(self):
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * RING)
        self.data = bytearray(RING)
        self.prod = 0

    def record(self, payload, busy=False, discard=False, at=None):
        pos = self.prod if at is None else at
        hdr = len(payload) | (ringbuf.BUSY_BIT if busy else 0) | (ringbuf.DISCARD_BIT if discard else 0)
        raw = struct.pack("<II", hdr, 0) + payload
        for i, b in enumerate(raw):
            self.data[(pos + i) % RING] = b
        self.prod = pos + ((len(payload) + 8 + 7) & ~7)
        self.flush()

    def flush(self):
        os.pwrite(self.fd, struct.pack("<Q", self.prod), PAGE)
        os.pwrite(self.fd, bytes(self.data) + b"\xee" * RING, 2 * PAGE)

    def set_consumer(self, pos):
        os.pwrite(self.fd, struct.pack("<Q", pos), 0)

    def consumer(self):
        return struct.unpack("<Q", os.pread(self.fd, 8, 0))[0]


@pytest.fixture
def ring():
    r = FakeRing()
    yield r
    os.close(r.fd)


def test_ring_reads_committed_records_and_skips_discarded(ring):
    ring.record(b"A" * 16)
    ring.record(b"B" * 16, discard=True)
    ring.record(b"C" * 20)  # longer than wanted: cut to the record size
    ring.record(b"D" * 4)  # shorter: handed over whole, for the caller to count
    got = []
    with ringbuf.RingReader(ring.fd, 16, size=RING) as reader:
        assert reader.consume(got.append) == 3
    assert got == [b"A" * 16, b"C" * 16, b"D" * 4]
    assert ring.consumer() == ring.prod


def test_ring_stops_at_a_busy_record(ring):
    ring.record(b"A" * 16)
    busy_at = ring.prod
    ring.record(b"B" * 16, busy=True)
    ring.record(b"C" * 16)
    got = []
    with ringbuf.RingReader(ring.fd, 16, size=RING) as reader:
        assert reader.consume(got.append) == 1
        assert ring.consumer() == busy_at  # never past an uncommitted record
        end = ring.prod
        ring.record(b"B" * 16, at=busy_at)  # committed now
        ring.prod = end
        ring.flush()
        assert reader.consume(got.append) == 2
    assert got == [b"A" * 16, b"B" * 16, b"C" * 16]


def test_ring_record_that_wraps_reads_whole(ring):
    start = 5 * RING - 16  # many laps in, 16 bytes before the end of the data
    ring.set_consumer(start)
    ring.prod = start
    payload = bytes(range(40))
    ring.record(payload)
    got = []
    layout = struct.Struct("<5Q")
    with ringbuf.RingReader(ring.fd, 40, event=layout, size=RING) as reader:
        assert reader.consume(None, got.extend) == 1
    assert got == [layout.unpack(payload)]
    assert ring.consumer() == start + 48


@pytest.mark.parametrize("before_end", [8, 16, 24, 40])
def test_ring_record_that_wraps_is_joined_when_handed_as_bytes(ring, before_end):
    start = 3 * RING - before_end  # the header at the end, or some of the payload too
    ring.set_consumer(start)
    ring.prod = start
    payload = bytes(range(100, 140))
    ring.record(payload)
    ring.record(b"N" * 16)  # the next record, after the wrapped one
    got = []
    with ringbuf.RingReader(ring.fd, 40, size=RING) as reader:
        assert reader.consume(got.append) == 2
    assert got == [payload, b"N" * 16]
    assert ring.consumer() == ring.prod


EVENT40 = struct.Struct("<5Q")
RECORDS = st.lists(
    st.tuples(st.sampled_from(["event", "event", "event", "other", "discard"]),
              st.integers(1, 64), st.binary(min_size=64, max_size=64)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(records=RECORDS, before_end=st.integers(1, RING // 8), busy_at=st.one_of(st.none(), st.integers(0, 40)))
def test_ring_runs_read_what_one_record_at_a_time_reads(records, before_end, busy_at):
    """Runs of event-sized records are read by struct in one go; around
    them, records of other sizes, discarded ones, an uncommitted one (where
    reading stops) and the end of the data (where a run must stop and a
    record may wrap) give the same records, in order, as the careful path."""
    ring = FakeRing()
    try:
        pos = ring.prod = 8 * RING - 8 * before_end  # laps in, often close to the end of the data
        ring.set_consumer(pos)
        expected, stop, used = [], None, 0
        for i, (kind, length, payload) in enumerate(records):
            body = payload[: 40 if kind == "event" else length]
            if used + ((len(body) + 15) & ~7) > RING:
                break
            used += (len(body) + 15) & ~7
            busy = i == busy_at
            if busy and stop is None:
                stop = ring.prod
            ring.record(body, busy=busy, discard=kind == "discard")
            if stop is None and kind != "discard":
                expected.append(("v", EVENT40.unpack(body[:40])) if len(body) >= 40 else ("b", body))
        got = []
        with ringbuf.RingReader(ring.fd, 40, event=EVENT40, size=RING) as reader:
            count = reader.consume(lambda raw: got.append(("b", raw)),
                                   lambda many: got.extend(("v", v) for v in many))
        assert got == expected and count == len(expected)
        assert ring.consumer() == (ring.prod if stop is None else stop)
    finally:
        os.close(ring.fd)


def test_ring_counts_what_waits_up_to_a_time(ring):
    for ts in (10, 20, 30):
        ring.record(struct.pack("<QQ", ts, 0))
    ring.record(struct.pack("<QQ", 15, 0), discard=True)
    ring.record(struct.pack("<QQ", 5, 0))
    ring.record(struct.pack("<QQ", 1, 0), busy=True)  # not committed: neither it nor what follows
    ring.record(struct.pack("<QQ", 2, 0))
    with ringbuf.RingReader(ring.fd, 16, size=RING) as reader:
        assert reader.count_ready() == 4
        assert reader.count_ready(until_ns=20) == 3
        assert reader.count_ready(until_ns=4) == 0
        assert ring.consumer() == 0  # counting reads nothing away
        got = []
        assert reader.consume(got.append) == 4 and reader.count_ready() == 0


def test_ring_event_struct_must_match_the_record():
    ring = FakeRing()
    try:
        for bad in (struct.Struct("<4Q"), struct.Struct("=5Q"), struct.Struct(">5Q")):
            with pytest.raises(ValueError):
                ringbuf.RingReader(ring.fd, 40, event=bad, size=RING)
    finally:
        os.close(ring.fd)


def test_ring_maps_the_data_once(ring):
    """Touching a record must not map the second copy of the data."""
    with ringbuf.RingReader(ring.fd, 16, size=RING) as reader:
        assert len(reader.prod) == PAGE + RING


def test_ring_size_must_be_a_power_of_two_pages(ring):
    with pytest.raises(ValueError):
        ringbuf.RingReader(ring.fd, 16, size=3 * PAGE)


# Offsets in the kernel's UAPI (linux/bpf.h, linux/perf_event.h): the
# structures are passed to the kernel as raw memory.
UAPI = [
    (bpfsys._ProgInfo, "id", 4),
    (bpfsys._ProgInfo, "run_time_ns", 192),
    (bpfsys._ProgInfo, "recursion_misses", 208),
    (bpfsys._MapCreateAttr, "map_name", 28),
    (bpfsys._ElemAttr, "key", 8),
    (bpfsys._ElemAttr, "flags", 24),
    (bpfsys._BatchAttr, "count", 32),
    (bpfsys._BatchAttr, "map_fd", 36),
    (bpfsys._BatchAttr, "flags", 48),
    (bpfsys._ProgLoadAttr, "license", 16),
    (bpfsys._ProgLoadAttr, "log_buf", 32),
    (bpfsys._ProgLoadAttr, "kern_version", 40),
    (bpfsys._ProgLoadAttr, "prog_name", 48),
    (bpfsys._InfoAttr, "info", 8),
    (bpfsys._MapInfo, "max_entries", 16),
    (bpfsys._MapInfo, "name", 24),
    (bpfsys._ProgInfo, "id", 4),
    (bpfsys._PerfEventAttr, "config", 8),
    (bpfsys._PerfEventAttr, "flags", 40),
    (bpfsys._PerfEventAttr, "wakeup_events", 48),
]


@pytest.mark.parametrize("cls, member, offset", UAPI, ids=[f"{c.__name__}.{m}" for c, m, _o in UAPI])
def test_uapi_offsets(cls, member, offset):
    assert getattr(cls, member).offset == offset


def test_perf_event_attr_is_the_first_published_size():
    assert ctypes.sizeof(bpfsys._PerfEventAttr) == 64  # PERF_ATTR_SIZE_VER0: every kernel takes it
