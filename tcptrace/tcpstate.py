"""TCP state numbers and names: the one mapping used everywhere.

The numbers are the kernel's (include/net/tcp_states.h), unchanged since 2.6.
"""

from .net import Fallback

ESTABLISHED = 1
SYN_SENT = 2
SYN_RECV = 3
FIN_WAIT1 = 4
FIN_WAIT2 = 5
TIME_WAIT = 6
CLOSE = 7
CLOSE_WAIT = 8
LAST_ACK = 9
LISTEN = 10
CLOSING = 11
NEW_SYN_RECV = 12

NAMES = {
    ESTABLISHED: "ESTABLISHED",
    SYN_SENT: "SYN_SENT",
    SYN_RECV: "SYN_RECV",
    FIN_WAIT1: "FIN_WAIT1",
    FIN_WAIT2: "FIN_WAIT2",
    TIME_WAIT: "TIME_WAIT",
    CLOSE: "CLOSE",
    CLOSE_WAIT: "CLOSE_WAIT",
    LAST_ACK: "LAST_ACK",
    LISTEN: "LISTEN",
    CLOSING: "CLOSING",
    NEW_SYN_RECV: "NEW_SYN_RECV",
}

_BY_NAME = {name: number for number, name in NAMES.items()}


# NAME[state]: the state's name, or the number as text for one the kernel
# may add later (a subscript: the decoders' per-event form of name()).
NAME = Fallback(NAMES, str)


def name(state):
    """The state's name; a number the kernel may add later is printed as that number."""
    return NAME[state]


def number(text):
    """The number for a state name (with or without the TCP_ prefix), or None."""
    text = text.upper()
    if text.startswith("TCP_"):
        text = text[4:]
    return _BY_NAME.get(text)
