"""Addresses, ports and task names as they arrive from the kernel."""

import socket

AF_INET = socket.AF_INET  # 2
AF_INET6 = socket.AF_INET6  # 10
IP_VERSION = {AF_INET: 4, AF_INET6: 6}

_ntop = socket.inet_ntop


def address(family, raw):
    """Text form of a 16-byte address field (IPv4 in the first 4 bytes)."""
    try:
        if family == AF_INET:
            return _ntop(AF_INET, raw[:4])
        if family == AF_INET6:
            return _ntop(AF_INET6, raw[:16])
    except (ValueError, OSError):
        pass
    return "?"


def endpoint(family, addr, port):
    """addr:port, with IPv6 bracketed so the port stays parseable."""
    if family == AF_INET6:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def comm(raw):
    """A task name from a NUL-padded char[16]."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
