"""Write the format files of kernels this project cannot boot, from their
sources.

Each tracepoint below is its TP_STRUCT__entry list and TP_printk line as
include/trace/events/{tcp,sock,skb}.h declare them in that kernel (where
each came from: README.md beside this file). Offsets, sizes and signedness
are computed the way ftrace computes them: the common header first, then
every entry in order at its natural C alignment on x86-64.

    python tests/data/formats/derive.py          # rewrite the derived sets
    python tests/data/formats/derive.py --check  # compare with what is saved

The real 6.1 set, read from a running kernel, is the check of the method:
tests/test_kernels.py derives 6.1 from the same entries and compares.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

COMMON = (
    ("unsigned short", "common_type", 0, 2, 0),
    ("unsigned char", "common_flags", 2, 1, 0),
    ("unsigned char", "common_preempt_count", 3, 1, 0),
    ("int", "common_pid", 4, 4, 1),
)

# C type -> (size, alignment, signed) on x86-64; enums are unsigned ints.
TYPES = {
    "const void *": (8, 8, 0),
    "void *": (8, 8, 0),
    "int": (4, 4, 1),
    "unsigned short": (2, 2, 0),
    "__u8": (1, 1, 0),
    "__u16": (2, 2, 0),
    "__u32": (4, 4, 0),
    "__u64": (8, 8, 0),
}
SIZEOF = {"sizeof(struct sockaddr_in6)": 28}


def F(ctype, name):
    return (ctype, name, None)


def A(ctype, name, length):
    return (ctype, name, length)


def layout(entries, numeric_arrays):
    """[(declaration, offset, size, signed)] after the common header."""
    out = []
    offset = 8
    for ctype, name, length in entries:
        if ctype.startswith("enum "):
            size, align, signed = 4, 4, 0
        else:
            size, align, signed = TYPES[ctype]
        offset += -offset % align
        if length is None:
            decl = f"{ctype} {name}"
        else:
            count = SIZEOF.get(length, length)
            shown = count if numeric_arrays or isinstance(length, int) else length
            decl = f"{ctype} {name}[{shown}]"
            size *= count
        out.append((decl, offset, size, signed))
        offset += size
    return out


def text(name, event_id, entries, print_fmt, numeric_arrays):
    lines = [f"name: {name}", f"ID: {event_id}", "format:"]
    for ctype, fname, offset, size, signed in COMMON:
        lines.append(f"\tfield:{ctype} {fname};\toffset:{offset};\tsize:{size};\tsigned:{signed};")
    lines.append("")
    for decl, offset, size, signed in layout(entries, numeric_arrays):
        lines.append(f"\tfield:{decl};\toffset:{offset};\tsize:{size};\tsigned:{signed};")
    lines.append("")
    lines.append(f"print fmt: {print_fmt}")
    return "\n".join(lines) + "\n"


# -- __print_symbolic tables as the format file shows them --------------------

TCP_STATES = ("ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE",
              "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV")


def symbolic(field, pairs):
    return f"__print_symbolic(REC->{field}, " + ", ".join(f"{{ {k}, \"{v}\" }}" for k, v in pairs) + ")"


FAMILY = symbolic("family", ((2, "AF_INET"), (10, "AF_INET6")))


def tcp_state(field):
    # tcp.h's own table: the sock system's TRACE_DEFINE_ENUMs do not reach
    # the tcp system, so its keys stay symbols in the format file.
    return symbolic(field, ((f"TCP_{s}", f"TCP_{s}") for s in TCP_STATES))


def sock_state(field):
    return symbolic(field, ((i + 1, f"TCP_{s}") for i, s in enumerate(TCP_STATES)))


def protocols(mptcp):
    pairs = [(6, "IPPROTO_TCP"), (33, "IPPROTO_DCCP"), (132, "IPPROTO_SCTP")]
    if mptcp:
        pairs.append((262, "IPPROTO_MPTCP"))
    return symbolic("protocol", pairs)


def fmt(string, *args):
    return f'"{string}", ' + ", ".join(args)


ADDRS = ("REC->sport", "REC->dport", "REC->saddr", "REC->daddr", "REC->saddr_v6", "REC->daddr_v6")
PORTS_ADDRS = "sport=%hu dport=%hu saddr=%pI4 daddr=%pI4 saddrv6=%pI6c daddrv6=%pI6c"
V4 = (A("__u8", "saddr", 4), A("__u8", "daddr", 4), A("__u8", "saddr_v6", 16), A("__u8", "daddr_v6", 16))

# -- the tracepoints, by the features their kernel has ------------------------
# state: tcp_event_sk_skb records the socket state (after 4.19, before 5.4)
# family: tcp events record sk_family (commit 3dd344ea84e1, Linux 5.12)
# proto16: inet_sock_set_state.protocol is __u16 and MPTCP is named (5.6)


def sk_skb(state, family):
    entries = [F("const void *", "skbaddr"), F("const void *", "skaddr")]
    entries += [F("int", "state")] if state else []
    entries += [F("__u16", "sport"), F("__u16", "dport")]
    entries += [F("__u16", "family")] if family else []
    string = ("family=%s " if family else "") + PORTS_ADDRS + (" state=%s" if state else "")
    args = ((FAMILY,) if family else ()) + ADDRS + ((tcp_state("state"),) if state else ())
    return entries + list(V4), fmt(string, *args)


def sk(family):
    entries = [F("const void *", "skaddr"), F("__u16", "sport"), F("__u16", "dport")]
    entries += [F("__u16", "family")] if family else []
    entries += list(V4) + [F("__u64", "sock_cookie")]
    string = ("family=%s " if family else "") + PORTS_ADDRS + " sock_cookie=%llx"
    args = ((FAMILY,) if family else ()) + ADDRS + ("REC->sock_cookie",)
    return entries, fmt(string, *args)


def synack(family):
    entries = [F("const void *", "skaddr"), F("const void *", "req"), F("__u16", "sport"), F("__u16", "dport")]
    entries += [F("__u16", "family")] if family else []
    string = ("family=%s " if family else "") + PORTS_ADDRS
    return entries + list(V4), fmt(string, *(((FAMILY,) if family else ()) + ADDRS))


def probe(family):
    entries = [A("__u8", "saddr", "sizeof(struct sockaddr_in6)"), A("__u8", "daddr", "sizeof(struct sockaddr_in6)"),
               F("__u16", "sport"), F("__u16", "dport")]
    entries += [F("__u16", "family")] if family else []
    entries += [F("__u32", "mark"), F("__u16", "data_len")]
    entries += [F("__u32", n) for n in ("snd_nxt", "snd_una", "snd_cwnd", "ssthresh", "snd_wnd", "srtt", "rcv_wnd")]
    entries += [F("__u64", "sock_cookie")]
    string = (("family=%s " if family else "") + "src=%pISpc dest=%pISpc mark=%#x data_len=%d snd_nxt=%#x "
              "snd_una=%#x snd_cwnd=%u ssthresh=%u snd_wnd=%u srtt=%u rcv_wnd=%u sock_cookie=%llx")
    args = ((FAMILY,) if family else ()) + tuple(f"REC->{n}" for n in (
        "saddr", "daddr", "mark", "data_len", "snd_nxt", "snd_una", "snd_cwnd", "ssthresh", "snd_wnd", "srtt",
        "rcv_wnd", "sock_cookie"))
    return entries, fmt(string, *args)


def set_state(proto16):
    entries = [F("const void *", "skaddr"), F("int", "oldstate"), F("int", "newstate"), F("__u16", "sport"),
               F("__u16", "dport"), F("__u16", "family"), F("__u16" if proto16 else "__u8", "protocol")]
    string = ("family=%s protocol=%s sport=%hu dport=%hu saddr=%pI4 daddr=%pI4 saddrv6=%pI6c daddrv6=%pI6c "
              "oldstate=%s newstate=%s")
    args = (FAMILY, protocols(proto16)) + ADDRS + (sock_state("oldstate"), sock_state("newstate"))
    return entries + list(V4), fmt(string, *args)


def kfree_skb():
    entries = [F("void *", "skbaddr"), F("void *", "location"), F("unsigned short", "protocol")]
    return entries, fmt("skbaddr=%p protocol=%u location=%p", "REC->skbaddr", "REC->protocol", "REC->location")


def events(state, family, proto16, with_kfree_skb):
    out = {
        "sock/inet_sock_set_state": set_state(proto16),
        "tcp/tcp_retransmit_skb": sk_skb(state, family),
        "tcp/tcp_send_reset": sk_skb(state, family),
        "tcp/tcp_receive_reset": sk(family),
        "tcp/tcp_destroy_sock": sk(family),
        "tcp/tcp_retransmit_synack": synack(family),
        "tcp/tcp_probe": probe(family),
    }
    if with_kfree_skb:
        out["skb/kfree_skb"] = kfree_skb()
    return out


# version -> (KERNEL_RELEASE, features). Array sizes given by an expression
# are printed as the expression before 6.1 and as a number from 6.1 on.
KERNELS = {
    "4.19": ("4.19.71", dict(state=False, family=False, proto16=False, with_kfree_skb=True, numeric=False)),
    "5.4": ("5.4.0", dict(state=True, family=False, proto16=False, with_kfree_skb=True, numeric=False)),
    "5.10": ("5.10.0", dict(state=True, family=False, proto16=True, with_kfree_skb=True, numeric=False)),
    "5.15": ("5.15.0", dict(state=True, family=True, proto16=True, with_kfree_skb=True, numeric=False)),
    "6.8": ("6.8.0", dict(state=True, family=True, proto16=True, with_kfree_skb=False, numeric=True)),
}
# The real 6.1 set checks the method: same entries as 5.15/6.8.
CHECK = {"6.1": dict(state=True, family=True, proto16=True, with_kfree_skb=False, numeric=True)}


def derive(features):
    """{"category/name": format text} for one kernel's features."""
    features = dict(features)
    numeric = features.pop("numeric")
    out = {}
    # IDs are placeholders: a kernel numbers its events at boot.
    for event_id, (path, (entries, print_fmt)) in enumerate(sorted(events(**features).items()), start=9000):
        out[path] = text(path.split("/", 1)[1], event_id, entries, print_fmt, numeric)
    return out


def write(version, root=HERE):
    release, features = KERNELS[version]
    base = os.path.join(root, version)
    for path, content in derive(features).items():
        os.makedirs(os.path.dirname(os.path.join(base, path)), exist_ok=True)
        with open(os.path.join(base, path + ".format"), "w") as f:
            f.write(content)
    with open(os.path.join(base, "KERNEL_RELEASE"), "w") as f:
        f.write(release + "\n")


def check(root=HERE):
    stale = []
    for version, (_release, features) in KERNELS.items():
        for path, content in derive(features).items():
            try:
                with open(os.path.join(root, version, path + ".format")) as f:
                    if f.read() != content:
                        stale.append(f"{version}/{path}")
            except FileNotFoundError:
                stale.append(f"{version}/{path}")
    return stale


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        stale = check()
        print("\n".join(stale) if stale else "derived format files are up to date")
        sys.exit(1 if stale else 0)
    for v in KERNELS:
        write(v)
