"""Addresses, ports and task names as they arrive from the kernel."""

import socket

AF_INET = socket.AF_INET  # 2
AF_INET6 = socket.AF_INET6  # 10
IP_VERSION = {AF_INET: 4, AF_INET6: 6}

_ntop = socket.inet_ntop


# A tracer sees the same few addresses and task names over and over: a
# bounded cache turns most conversions into one dict lookup.
_CACHE_MAX = 16384
_addresses = {}
_comms = {}


def _convert_address(family, raw):
    try:
        if family == AF_INET:
            return _ntop(AF_INET, raw[:4])
        if family == AF_INET6:
            return _ntop(AF_INET6, raw[:16])
    except (ValueError, OSError):
        pass
    return "?"


def address(family, raw):
    """Text form of a 16-byte address field (IPv4 in the first 4 bytes)."""
    key = (family, raw)
    text = _addresses.get(key)
    if text is None:
        if len(_addresses) >= _CACHE_MAX:
            _addresses.clear()
        text = _addresses[key] = _convert_address(family, raw)
    return text


def endpoint(family, addr, port):
    """addr:port, with IPv6 bracketed so the port stays parseable."""
    if family == AF_INET6:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def comm(raw):
    """A task name from a NUL-padded char[16]."""
    text = _comms.get(raw)
    if text is None:
        if len(_comms) >= _CACHE_MAX:
            _comms.clear()
        text = _comms[raw] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return text
