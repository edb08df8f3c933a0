"""Save what a running kernel tells tcptrace, as tests/data/formats/<kernel>.

    python tests/kernel/harvest.py DIR     # root: tracefs and BTF are read

writes DIR/KERNEL_RELEASE, DIR/<category>/<name>.format for every event of
the skb, sock and tcp systems as tracefs shows it, and DIR/btf.json: the
byte offset and size of every member of the socket structs tcptrace reads
(and of any struct a program declares), as this kernel's BTF lays them out.
`make test-kernel` runs it in each guest (results in
build/test-kernel/<version>/formats); the saved sets are those copies, and
the smoke suite checks that each still equals its kernel.

btf.json holds what tcptrace.btf.struct_offsets finds: members reachable
through anonymous structs and unions are listed under the outer struct,
bitfields (which tcptrace never reads) are left out. A struct listed there
has all its members listed, so a member absent from it is absent from the
kernel. A btf_trace_<event> entry is a tracepoint's arguments as a raw
tracepoint program finds them (tcptrace.btf.PROTOTYPES), present where the
kernel's prototype is the one expected.
"""

import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORMATS = os.path.join(ROOT, "tests", "data", "formats")
sys.path.insert(0, ROOT)

from tcptrace import btf, tracefs  # noqa: E402

CATEGORIES = ("skb", "sock", "tcp")
# The structs tcptrace's programs read or may read (sockets, packets, and a
# socket's cgroup and network namespace), beyond those a program declares
# today (btf_structs() adds those).
STRUCTS = ("sock_common", "sock", "inet_sock", "inet_connection_sock", "tcp_sock", "sk_buff",
           "request_sock", "inet_request_sock", "sock_cgroup_data", "cgroup", "kernfs_node", "net",
           "ns_common")


def btf_structs():
    from tcptrace import doctor
    from tcptrace.programs import PROGRAMS

    names = list(STRUCTS)
    for spec in PROGRAMS.values():
        names += list(doctor.btf_wanted(spec))
    return sorted(set(names))


def _flatten(blob, type_id, base, out):
    for name, mtype, bit_offset, bits in blob.members(type_id):
        if name:
            if bits or bit_offset % 8:
                continue
            out.setdefault(name, [base + bit_offset // 8, blob.size(mtype)])
            continue
        inner = blob.resolve(mtype)
        if blob._header(inner)[1] in (btf.KIND_STRUCT, btf.KIND_UNION):
            _flatten(blob, inner, base + bit_offset // 8, out)


def btf_facts(blob, names):
    """{struct: {member: [offset, size]}} for the named structs the BTF has."""
    wanted = {n.encode(): n for n in names}
    ids = {}
    # One pass over the types: finding each struct by itself rereads them all.
    for type_id in range(1, len(blob.records)):
        name_off, kind, vlen, _kf, _size = blob._header(type_id)
        if kind == btf.KIND_STRUCT and name_off and vlen:
            start = blob.strings_start + name_off
            end = blob.data.index(b"\0", start, blob.strings_end)
            name = wanted.get(blob.data[start:end])
            if name and name not in ids:
                ids[name] = type_id
    facts = {}
    for name in sorted(ids):
        members = {}
        _flatten(blob, ids[name], 0, members)
        facts[name] = dict(sorted(members.items()))
    # The tracepoints taken raw: their arguments' places, where the
    # prototype is the one tcptrace expects.
    for name in sorted(n for n in names if n in btf.PROTOTYPES):
        args = btf.tracepoint_args(blob, name, [arg for arg, _type in btf.PROTOTYPES[name]])
        if args:
            facts[name] = {arg: list(where) for arg, where in sorted(args.items())}
    return dict(sorted(facts.items()))


def live_btf_facts(names=None, path=btf.VMLINUX):
    with open(path, "rb") as f:
        return btf_facts(btf.BTF(f.read()), names or btf_structs())


def dump_btf(facts):
    """One member per line: diffs between kernels stay readable."""
    lines = ["{"]
    for i, (struct, members) in enumerate(facts.items()):
        lines.append(f"  {json.dumps(struct)}: {{")
        for j, (member, where) in enumerate(members.items()):
            comma = "," if j < len(members) - 1 else ""
            lines.append(f"    {json.dumps(member)}: {json.dumps(where)}{comma}")
        lines.append("  }" + ("," if i < len(facts) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def harvest(out):
    root = tracefs.ensure_mounted()
    if not root:
        raise SystemExit("harvest: tracefs is not mounted and cannot be mounted")
    os.makedirs(out, exist_ok=True)
    for category in CATEGORIES:
        shutil.rmtree(os.path.join(out, category), ignore_errors=True)
        events = os.path.join(root, "events", category)
        for name in sorted(os.listdir(events)):
            src = os.path.join(events, name, "format")
            if not os.path.isfile(src):
                continue
            os.makedirs(os.path.join(out, category), exist_ok=True)
            with open(src) as f:
                text = f.read()
            with open(os.path.join(out, category, name + ".format"), "w") as f:
                f.write(text)
    with open(os.path.join(out, "KERNEL_RELEASE"), "w") as f:
        f.write(os.uname().release + "\n")
    if os.path.exists(btf.VMLINUX):
        with open(os.path.join(out, "btf.json"), "w") as f:
            f.write(dump_btf(live_btf_facts()))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    harvest(sys.argv[1])
