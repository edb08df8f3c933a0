"""The BTF reader: a blob built here byte by byte, and the running kernel's."""

import os
import struct

import pytest

from tcptrace import btf
from tcptrace.btf import BTF, BTFError

INT_SIGNED = 1 << 24  # BTF_INT_SIGNED in the int encoding word


class Blob:
    """A BTF blob assembled as Documentation/bpf/btf.rst lays it out."""

    def __init__(self):
        self.strings = b"\0"
        self.types = []  # encoded records; type id = index + 1

    def name(self, text):
        if not text:
            return 0
        offset = len(self.strings)
        self.strings += text.encode() + b"\0"
        return offset

    def add(self, name, kind, vlen, size_or_type, trailer=b"", kind_flag=False):
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self.types.append(struct.pack("<III", self.name(name), info, size_or_type) + trailer)
        return len(self.types)

    def int_(self, name, size, signed=False):
        encoding = (INT_SIGNED if signed else 0) | (size * 8)
        return self.add(name, btf.KIND_INT, 0, size, struct.pack("<I", encoding))

    def composite(self, kind, name, size, members, kind_flag=False):
        """members: (name, type id, bit offset, bitfield size)."""
        trailer = b""
        for mname, mtype, bit_offset, bits in members:
            offset = (bits << 24) | bit_offset if kind_flag else bit_offset
            trailer += struct.pack("<III", self.name(mname), mtype, offset)
        return self.add(name, kind, len(members), size, trailer, kind_flag)

    def bytes(self, magic=btf.MAGIC, type_len_delta=0):
        types = b"".join(self.types)
        header = struct.pack("<HBBIIIII", magic, 1, 0, 24, 0, len(types) + type_len_delta,
                             len(types), len(self.strings))
        return header + types + self.strings


@pytest.fixture
def demo():
    """struct demo { int x; unsigned int flag:3; u64 big; union { int a; u64 b; }; };
    struct holder { struct demo *p; int arr[4]; };  plus an empty `struct demo`
    declared first, as BTF can hold several types of one name."""
    b = Blob()
    ids = {}
    ids["empty"] = b.composite(btf.KIND_STRUCT, "demo", 0, [])
    ids["int"] = b.int_("int", 4, signed=True)
    ids["ull"] = b.int_("unsigned long long", 8)
    ids["u64"] = b.add("u64", btf.KIND_TYPEDEF, 0, ids["ull"])
    ids["cu64"] = b.add("", btf.KIND_CONST, 0, ids["u64"])
    ids["union"] = b.composite(btf.KIND_UNION, "", 8, [("a", ids["int"], 0, 0), ("b", ids["cu64"], 0, 0)])
    ids["demo"] = b.composite(
        btf.KIND_STRUCT, "demo", 24,
        [("x", ids["int"], 0, 0), ("flag", ids["int"], 32, 3), ("big", ids["u64"], 64, 0),
         ("", ids["union"], 128, 0)],
        kind_flag=True,
    )
    ids["ptr"] = b.add("", btf.KIND_PTR, 0, ids["demo"])
    ids["array"] = b.add("", btf.KIND_ARRAY, 0, 0, struct.pack("<III", ids["int"], ids["int"], 4))
    ids["holder"] = b.composite(btf.KIND_STRUCT, "holder", 24, [("p", ids["ptr"], 0, 0),
                                                                 ("arr", ids["array"], 64, 0)])
    return b, ids


@pytest.mark.parametrize("member, expected", [
    ("x", (0, 4)),
    ("big", (8, 8)),  # through a typedef
    ("a", (16, 4)),  # inside an anonymous union
    ("b", (16, 8)),  # through const and typedef, inside the union
    ("nope", None),
])
def test_member_offsets(demo, member, expected):
    b, ids = demo
    parsed = BTF(b.bytes())
    assert parsed.member_offset(ids["demo"], member) == expected


def test_bitfield_is_refused(demo):
    b, ids = demo
    with pytest.raises(BTFError, match="bitfield"):
        BTF(b.bytes()).member_offset(ids["demo"], "flag")


def test_types_sizes_and_names(demo):
    b, ids = demo
    parsed = BTF(b.bytes())
    assert len(parsed.records) == len(b.types) + 1  # and void, id 0
    assert parsed.find("demo", btf.KIND_STRUCT) == [ids["empty"], ids["demo"]]
    assert parsed.find("demo", btf.KIND_UNION) == []
    assert parsed.size(ids["u64"]) == 8
    assert parsed.size(ids["ptr"]) == 8
    assert parsed.size(ids["array"]) == 16
    assert parsed.resolve(ids["cu64"]) == ids["ull"]
    assert parsed.member_offset(ids["holder"], "p") == (0, 8)
    assert parsed.member_offset(ids["holder"], "arr") == (8, 16)
    assert [m[0] for m in parsed.members(ids["demo"])] == ["x", "flag", "big", ""]
    with pytest.raises(BTFError, match="not a struct"):
        parsed.members(ids["int"])


def test_struct_offsets_skips_empty_declarations_absent_members_and_bitfields(demo):
    b, _ids = demo
    found = btf.struct_offsets(BTF(b.bytes()), "demo", ["x", "big", "b", "absent", "flag"])
    assert found == {"x": (0, 4), "big": (8, 8), "b": (16, 8)}
    assert btf.struct_offsets(BTF(b.bytes()), "no_such_struct", ["x"]) == {}


@pytest.mark.parametrize("damage, message", [
    (lambda blob: blob[:20], "too short"),
    (lambda blob: blob[:-5], "past the end"),
    (lambda blob: struct.pack("<H", 0x9FEB) + blob[2:], "bad magic"),  # the other byte order
    (lambda blob: blob[:12] + struct.pack("<I", 20) + blob[16:], "malformed"),  # ends inside a record
])
def test_damaged_blobs_are_refused(demo, damage, message):
    b, _ids = demo
    with pytest.raises(BTFError, match=message):
        BTF(damage(b.bytes()))


def test_kernel_offsets_cache(demo, tmp_path, monkeypatch):
    b, _ids = demo
    path = tmp_path / "vmlinux"
    path.write_bytes(b.bytes())
    monkeypatch.setenv("TCPTRACE_CACHE_DIR", str(tmp_path / "cache"))
    first = btf.kernel_offsets("demo", ["x", "b"], path=str(path))
    assert first == {"x": (0, 4), "b": (16, 8)}
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    assert btf.kernel_offsets("demo", ["x", "b"], path=str(path)) == first
    assert btf.kernel_offsets("demo", ["x"], path=str(tmp_path / "absent")) is None


@pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="this kernel has no BTF")
def test_running_kernel_tcp_sock():
    with open(btf.VMLINUX, "rb") as f:
        parsed = BTF(f.read())
    wanted = {"bytes_acked": 8, "bytes_received": 8, "snd_una": 4, "rcv_nxt": 4, "srtt_us": 4}
    found = btf.struct_offsets(parsed, "tcp_sock", list(wanted))
    assert {m: size for m, (_off, size) in found.items()} == wanted
    (tcp_sock,) = [i for i in parsed.find("tcp_sock", btf.KIND_STRUCT) if parsed.members(i)]
    (icsk,) = [i for i in parsed.find("inet_connection_sock", btf.KIND_STRUCT) if parsed.members(i)]
    # tcp_sock begins with its inet_connection_sock: its own members follow it.
    assert parsed.member_offset(tcp_sock, "inet_conn") == (0, parsed.size(icsk))
    for member, (offset, size) in found.items():
        assert parsed.size(icsk) <= offset and offset + size <= parsed.size(tcp_sock), member
        assert offset % size == 0, member
    assert btf.kernel_offsets("tcp_sock", list(wanted), cache=False) == found


def tracepoint_blob(params):
    """typedef void (*btf_trace_inet_sock_set_state)(void *, params...), the
    kernel's record of a tracepoint's prototype; params are type names:
    "sock" (const struct sock *), "sk_buff *", "int", "u64"."""
    b = Blob()
    ids = {"int": b.int_("int", 4, signed=True), "u64": b.int_("unsigned long long", 8)}
    for name in ("sock", "sk_buff"):
        ids[name] = b.composite(btf.KIND_STRUCT, name, 8, [("x", ids["u64"], 0, 0)])
    const_sock = b.add("", btf.KIND_CONST, 0, ids["sock"])
    ids["sock"] = b.add("", btf.KIND_PTR, 0, const_sock)
    ids["sk_buff *"] = b.add("", btf.KIND_PTR, 0, ids["sk_buff"])
    void_ptr = b.add("", btf.KIND_PTR, 0, 0)
    trailer = b"".join(struct.pack("<II", 0, t) for t in [void_ptr] + [ids[p] for p in params])
    proto = b.add("", btf.KIND_FUNC_PROTO, 1 + len(params), 0, trailer)
    ptr = b.add("", btf.KIND_PTR, 0, proto)
    b.add("btf_trace_inet_sock_set_state", btf.KIND_TYPEDEF, 0, ptr)
    return BTF(b.bytes())


@pytest.mark.parametrize("params, expected", [
    (["sock", "int", "int"], {"sk": (0, 8), "oldstate": (8, 8), "newstate": (16, 8)}),
    (["sock", "int", "int", "u64"], {"sk": (0, 8), "oldstate": (8, 8), "newstate": (16, 8)}),  # one more after
    (["sk_buff *", "int", "int"], {}),  # another struct
    (["sock", "u64", "int"], {}),  # another size
    (["sock", "int"], {}),  # too few
    (["int", "sock", "int"], {}),  # another order
])
def test_tracepoint_args_by_position_where_the_types_match(params, expected):
    blob = tracepoint_blob(params)
    asked = ["sk", "oldstate", "newstate"]
    assert btf.struct_offsets(blob, "btf_trace_inet_sock_set_state", asked) == expected
    assert btf.struct_offsets(blob, "btf_trace_inet_sock_set_state", ["newstate"]) == (
        {"newstate": (16, 8)} if expected else {})


def test_running_kernel_state_change_arguments():
    found = btf.kernel_offsets("btf_trace_inet_sock_set_state", ["sk", "oldstate", "newstate"], cache=False)
    assert found == {"sk": (0, 8), "oldstate": (8, 8), "newstate": (16, 8)}
