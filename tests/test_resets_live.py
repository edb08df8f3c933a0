"""tcptrace resets against real resets (root + BPF)."""

import os
import socket
import sys

import pytest

from endpoint import Endpoint
from helpers import Tracer, free_port
from test_workload_live import NO_WORKLOAD, own_workload
from tcptrace import tracefs

HOSTS = {"v4": ("127.0.0.1", socket.AF_INET, 4), "v6": ("::1", socket.AF_INET6, 6)}
COMM = os.path.basename(sys.executable)[:15]


def send_reset_format():
    return tracefs.FormatSource(tracefs.ensure_mounted()).load("tcp:tcp_send_reset")


def kernel_reason(name):
    """The reason a SENT row carries on this kernel: the name where the
    tracepoint has a reason field (6.10+), else none."""
    return name if send_reset_format().has("reason") else None


def rows_by_dir(rows):
    out = {}
    for row in rows:
        assert row["dir"] not in out, f"two {row['dir']} rows: {rows}"
        out[row["dir"]] = row
    return out


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_connect_to_closed_port(bpf, ip):
    """A SYN to a port nobody listens on: the kernel answers with a reset for
    which no socket exists, and the client receives it in SYN_SENT."""
    host, family, version = HOSTS[ip]
    closed, cport = free_port(family, host), free_port(family, host)
    with Tracer("resets", "-o", "json", "-L", f"{closed},{cport}") as t:
        client = Endpoint("client", host, closed, "--bind-port", cport)
        assert client.outcome() == "refused"
        assert t.stop() == 0, t.stderr
    rows = t.json_rows()
    recv = {"pid": client.pid, "comm": COMM, "family": version, "dir": "RECV", "laddr": host, "lport": cport,
            "raddr": host, "rport": closed, "state": "SYN_SENT", "reason": None, **own_workload()}
    if send_reset_format().has("saddr", 28):
        # The addresses come from the SYN, swapped by the kernel so that the
        # source is the side sending the reset: local is the closed port.
        sent = {"pid": None, "comm": None, "family": version, "dir": "SENT", "laddr": host, "lport": closed,
                "raddr": host, "rport": cport, "state": None, "reason": "NO_SOCKET", **NO_WORKLOAD}
        assert rows == [sent, recv]
    else:
        # Before 6.10 tcp_send_reset does not fire without a full socket.
        assert rows == [recv]


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_server_closes_with_unread_data(bpf, ip):
    """close() with unread data aborts an established connection: the
    server's child sends the reset, with the listener's owner as its owner."""
    host, family, version = HOSTS[ip]
    sport, cport = free_port(family, host), free_port(family, host)
    with Tracer("resets", "-o", "json", "-L", f"{sport},{cport}") as t:
        server = Endpoint("server", host, sport, "--abort-unread")
        client = Endpoint("client", host, sport, "--bind-port", cport, "--send", 100)
        assert client.outcome() == "ok"
        server.outcome()
        assert t.stop() == 0, t.stderr
    rows = rows_by_dir(t.json_rows())
    assert rows == {
        "SENT": {"pid": server.pid, "comm": COMM, "family": version, "dir": "SENT", "laddr": host,
                 "lport": sport, "raddr": host, "rport": cport, "state": "ESTABLISHED",
                 "reason": kernel_reason("TCP_ABORT_ON_CLOSE"), **own_workload()},
        "RECV": {"pid": client.pid, "comm": COMM, "family": version, "dir": "RECV", "laddr": host,
                 "lport": cport, "raddr": host, "rport": sport, "state": "ESTABLISHED", "reason": None,
                 **own_workload()},
    }


def test_client_closes_with_linger_zero(bpf):
    """SO_LINGER 0 then close(): the kernel disconnects with a reset."""
    sport, cport = free_port(), free_port()
    with Tracer("resets", "-o", "json", "-L", f"{sport},{cport}") as t:
        server = Endpoint("server", "127.0.0.1", sport)
        client = Endpoint("client", "127.0.0.1", sport, "--bind-port", cport, "--linger0")
        assert client.outcome() == "ok"
        server.outcome()
        assert t.stop() == 0, t.stderr
    rows = rows_by_dir(t.json_rows())
    assert rows["SENT"]["pid"] == client.pid and rows["SENT"]["lport"] == cport
    assert rows["SENT"]["state"] == "ESTABLISHED"
    assert rows["SENT"]["reason"] == kernel_reason("TCP_STATE")
    assert rows["RECV"]["pid"] == server.pid and rows["RECV"]["lport"] == sport
    assert rows["RECV"]["rport"] == cport and rows["RECV"]["state"] == "ESTABLISHED"


def test_pid_filter_keeps_that_owner_only(bpf):
    """-p keeps the resets of sockets the process owns: not its peer's, not
    one answering a closed port (no socket, no owner)."""
    sport, cport, closed = free_port(), free_port(), free_port()
    server = Endpoint("server", "127.0.0.1", sport, "--abort-unread", hold=True)
    try:
        with Tracer("resets", "-o", "json", "-p", str(server.pid), "-L", f"{sport},{cport},{closed}") as t:
            server.go()
            client = Endpoint("client", "127.0.0.1", sport, "--bind-port", cport, "--send", 10)
            assert client.outcome() == "ok"
            server.outcome()
            assert Endpoint("client", "127.0.0.1", closed).outcome() == "refused"
            assert t.stop() == 0, t.stderr
    finally:
        server.kill()
    rows = t.json_rows()
    assert [(r["dir"], r["pid"], r["lport"], r["rport"]) for r in rows] == [("SENT", server.pid, sport, cport)]


def test_count_per_endpoint_pair_direction_and_reason(bpf):
    closed, cport = free_port(), free_port()
    with Tracer("resets", "-c", "-o", "json", "-L", f"{closed},{cport}") as t:
        for _ in range(3):
            assert Endpoint("client", "127.0.0.1", closed, "--bind-port", cport).outcome() == "refused"
        assert t.stop() == 0, t.stderr
    rows = t.json_rows()
    recv = {"dir": "RECV", "laddr": "127.0.0.1", "lport": cport, "raddr": "127.0.0.1", "rport": closed,
            "reason": None, "count": 3}
    if send_reset_format().has("saddr", 28):
        sent = {"dir": "SENT", "laddr": "127.0.0.1", "lport": closed, "raddr": "127.0.0.1", "rport": cport,
                "reason": "NO_SOCKET", "count": 3}
        assert sorted(rows, key=lambda r: r["dir"]) == [recv, sent]
    else:
        assert rows == [recv]


def test_table_output(bpf):
    closed, cport = free_port(), free_port()
    with Tracer("resets", "-L", str(cport)) as t:
        assert Endpoint("client", "127.0.0.1", closed, "--bind-port", cport).outcome() == "refused"
        assert t.stop() == 0, t.stderr
    lines = t.stdout.splitlines()
    assert lines[0].split() == ["PID", "COMM", "DIR", "LADDR", "LPORT", "RADDR", "RPORT", "STATE", "REASON"]
    assert lines[1].split()[2:] == ["RECV", "127.0.0.1", str(cport), "127.0.0.1", str(closed), "SYN_SENT", "-"]
    assert len(lines) == 2
