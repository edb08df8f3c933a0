"""Addresses, ports and task names as they arrive from the kernel."""

import re
import socket

AF_INET = socket.AF_INET  # 2
AF_INET6 = socket.AF_INET6  # 10


class Fallback(dict):
    """A dict whose lookup of a missing key gives missing(key), not stored:
    a decoder's per-event lookup stays one subscript in C."""

    __slots__ = ("missing",)

    def __init__(self, items, missing):
        super().__init__(items)
        self.missing = missing

    def __missing__(self, key):
        return self.missing(key)


IP_VERSION = Fallback({AF_INET: 4, AF_INET6: 6}, lambda family: family)  # 4, 6, or the family number

_ntop = socket.inet_ntop


# A tracer sees the same few addresses and task names over and over: a
# bounded cache turns most conversions into one dict lookup. The caches are
# dicts that convert what they miss (__missing__), so a decoder's lookup,
# ADDRESS[family][raw] or COMM[raw], is a subscript in C when it hits.
_CACHE_MAX = 16384


class _Cache(dict):
    __slots__ = ("convert",)

    def __init__(self, convert):
        super().__init__()
        self.convert = convert

    def __missing__(self, key):
        if len(self) >= _CACHE_MAX:
            self.clear()
        value = self[key] = self.convert(key)
        return value


def _converter(family, length):
    def convert(raw):
        try:
            return _ntop(family, raw[:length])
        except (ValueError, OSError):
            return "?"
    return convert


_UNKNOWN = _Cache(lambda raw: "?")
# ADDRESS[family]: the address cache of a family; one that is neither IPv4
# nor IPv6 gives "?" for any address.
ADDRESS = Fallback({AF_INET: _Cache(_converter(AF_INET, 4)), AF_INET6: _Cache(_converter(AF_INET6, 16))},
                   lambda family: _UNKNOWN)
# A task name may hold any byte but NUL (PR_SET_NAME): control characters
# are escaped, so a name never breaks a row of any output in two.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
COMM = _Cache(lambda raw: _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()),
                                       raw.split(b"\0", 1)[0].decode("utf-8", "replace")))


def address(family, raw):
    """Text form of a 16-byte address field (IPv4 in the first 4 bytes)."""
    return ADDRESS[family][raw]


def endpoint(family, addr, port):
    """addr:port, with IPv6 bracketed so the port stays parseable."""
    if family == AF_INET6:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def comm(raw):
    """A task name from a NUL-padded char[16]."""
    return COMM[raw]
