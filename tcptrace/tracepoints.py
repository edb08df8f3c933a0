"""The kernel's tracepoints tcptrace reads: the first kernel of each, and of
the fields that came later. One table for the tools (spec.Tracepoint takes
its `since` from here), doctor's messages and docs/kernels.md.

Tracepoints: their merge into mainline (the TCP ones of 4.15 and 4.16 are
listed in the post that started this project). Fields: the first release
whose format has them, as the kernel's history and the formats of tested
kernels (tests/data/formats) show; a test holds this table to those formats.
"""

from .headers import version_triple

FIRST = {
    "sock:inet_sock_set_state": "4.16",
    "tcp:tcp_retransmit_skb": "4.15",
    "tcp:tcp_retransmit_synack": "4.15",
    "tcp:tcp_send_reset": "4.15",
    "tcp:tcp_receive_reset": "4.15",
    "tcp:tcp_destroy_sock": "4.15",
    "tcp:tcp_probe": "4.16",
    "tcp:tcp_bad_csum": "5.14",
    "tcp:tcp_cong_state_set": "5.19",
    "sock:inet_sk_error_report": "5.15",
    "sock:sock_send_length": "6.3",
    "sock:sock_recv_length": "6.3",
    "skb:kfree_skb": "4.15",  # far older; 4.15 is as far back as tcptrace goes
}

# A field that came later: its first kernel, or (first, gone) when a later
# kernel dropped it (6.10 rewrote tcp_send_reset around sockaddrs).
FIELDS = {
    "tcp:tcp_retransmit_skb": {"state": "5.4", "family": "5.15", "err": "6.17"},
    "tcp:tcp_retransmit_synack": {"family": "5.15"},
    "tcp:tcp_send_reset": {"state": "5.4", "family": ("5.15", "6.10"), "sport": ("4.15", "6.10"),
                           "dport": ("4.15", "6.10"), "reason": "6.10"},
    "tcp:tcp_receive_reset": {"family": "5.15"},
    "tcp:tcp_destroy_sock": {"family": "5.15"},
    "tcp:tcp_probe": {"family": "5.15", "skaddr": "6.9", "skbaddr": "6.9"},
    "skb:kfree_skb": {"reason": "5.17", "rx_sk": "6.10"},
}


def since(name, fields=()):
    """The first kernel with tracepoint `name` and all of `fields` (an entry
    may be a tuple of alternatives: the earliest of them counts); "" when
    the table does not know the tracepoint."""
    if name not in FIRST:
        return ""
    versions = [FIRST[name]]
    for entry in fields:
        names = entry if isinstance(entry, tuple) else (entry,)
        versions.append(min((field_range(name, n)[0] for n in names), key=version_triple))
    return max(versions, key=version_triple)


def field_range(name, field):
    """(first kernel, first kernel without it or None) of a tracepoint's field."""
    known = FIELDS.get(name, {}).get(field, FIRST.get(name, ""))
    return known if isinstance(known, tuple) else (known, None)
