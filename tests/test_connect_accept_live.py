"""tcptrace connect and accept against real connections (root + BPF)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from endpoint import Endpoint
from helpers import Tracer, free_port, session
from test_workload_live import own_workload

HOSTS = {"v4": ("127.0.0.1", socket.AF_INET, 4), "v6": ("::1", socket.AF_INET6, 6)}
COMM = os.path.basename(sys.executable)[:15]


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_connect_and_accept_of_one_session(bpf, ip):
    host, family, version = HOSTS[ip]
    sport, cport = free_port(family, host), free_port(family, host)
    with Tracer("connect", "-o", "json", "-D", str(sport)) as conn, \
            Tracer("accept", "-o", "json", "-L", str(sport)) as acc:
        server, client = session(host, sport, cport, client_send=100, server_send=100)
        assert conn.stop() == 0, conn.stderr
        assert acc.stop() == 0, acc.stderr
    [row] = conn.json_rows()
    lat = row.pop("lat_ms")
    assert row == {"pid": client.pid, "comm": COMM, "family": version, "laddr": host, "lport": cport,
                   "raddr": host, "rport": sport, "result": "OK", **own_workload()}
    assert isinstance(lat, float) and lat > 0
    [row] = acc.json_rows()
    syn_recv = row.pop("syn_recv_ms")
    assert row == {"pid": server.pid, "comm": COMM, "family": version, "laddr": host, "lport": sport,
                   "raddr": host, "rport": cport, **own_workload()}
    assert isinstance(syn_recv, float) and syn_recv >= 0


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_refused_connect(bpf, ip):
    host, family, version = HOSTS[ip]
    closed, cport = free_port(family, host), free_port(family, host)
    with Tracer("connect", "-o", "json", "-L", str(cport)) as conn, \
            Tracer("accept", "-o", "json", "-L", str(closed)) as acc:
        client = Endpoint("client", host, closed, "--bind-port", cport)
        assert client.outcome() == "refused"
        assert conn.stop() == 0 and acc.stop() == 0
    [row] = conn.json_rows()
    lat = row.pop("lat_ms")
    assert row == {"pid": client.pid, "comm": COMM, "family": version, "laddr": host, "lport": cport,
                   "raddr": host, "rport": closed, "result": "REFUSED", **own_workload()}
    assert lat > 0
    assert acc.json_rows() == []


def test_failed_shows_only_failures(bpf):
    sport, closed = free_port(), free_port()
    with Tracer("connect", "-o", "json", "--failed", "-D", f"{sport},{closed}") as failed, \
            Tracer("connect", "-o", "json", "-D", f"{sport},{closed}") as every:
        session("127.0.0.1", sport, free_port())
        assert Endpoint("client", "127.0.0.1", closed).outcome() == "refused"
        assert failed.stop() == 0 and every.stop() == 0
    assert [(r["rport"], r["result"]) for r in failed.json_rows()] == [(closed, "REFUSED")]
    assert [(r["rport"], r["result"]) for r in every.json_rows()] == [(sport, "OK"), (closed, "REFUSED")]


def test_pid_filters(bpf):
    """-p keeps one connecting process for connect and one listening process
    for accept; both start held, so their PIDs are known to the filter."""
    ports = [free_port(), free_port()]
    servers = [Endpoint("server", "127.0.0.1", port, hold=True) for port in ports]
    clients = [Endpoint("client", "127.0.0.1", port, "--send", 10, "--close-first", hold=True) for port in ports]
    try:
        with Tracer("connect", "-o", "json", "-p", str(clients[0].pid), "-D", ",".join(map(str, ports))) as conn, \
                Tracer("accept", "-o", "json", "-p", str(servers[1].pid), "-L", ",".join(map(str, ports))) as acc:
            for server, client in zip(servers, clients):
                server.go()
                client.go()
                assert client.outcome() == "ok"
                server.outcome()
            assert conn.stop() == 0 and acc.stop() == 0
    finally:
        for endpoint in servers + clients:
            endpoint.kill()
    assert [(r["pid"], r["rport"]) for r in conn.json_rows()] == [(clients[0].pid, ports[0])]
    assert [(r["pid"], r["lport"]) for r in acc.json_rows()] == [(servers[1].pid, ports[1])]


def test_listener_opened_before_tracing(bpf):
    """A listener that was already listening when tracing began: its owner
    comes from /proc at start, and its connections carry it."""
    sport, cport = free_port(), free_port()
    server = Endpoint("server", "127.0.0.1", sport)
    try:
        with Tracer("accept", "-o", "json", "-L", str(sport)) as acc:
            assert Endpoint("client", "127.0.0.1", sport, "--bind-port", cport, "--close-first").outcome() == "ok"
            server.outcome()
            assert acc.stop() == 0
    finally:
        server.kill()
    assert [(r["pid"], r["comm"], r["rport"]) for r in acc.json_rows()] == [(server.pid, COMM, cport)]


class Namespace:
    """A network namespace of this test's own with only loopback, where
    nftables drops every SYN to one port: connects to it get no answer."""

    def __init__(self, port):
        self.name = f"ttconn{os.getpid() % 100000}x{int(time.time() * 1000) % 100000}"
        self.port = port

    def run(self, *cmd):
        subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=True, capture_output=True, text=True)

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self.run("ip", "link", "set", "lo", "up")
            self.run("nft", "add", "table", "inet", "tcptrace_test")
            self.run("nft", "add", "chain", "inet", "tcptrace_test", "input",
                     "{ type filter hook input priority 0 ; policy accept ; }")
            self.run("nft", "add", "rule", "inet", "tcptrace_test", "input", "tcp", "dport", str(self.port),
                     "tcp", "flags", "syn", "drop")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        return False


def test_timeout_and_given_up(bpf):
    """Unanswered SYNs: with one SYN retry the kernel gives up with
    ETIMEDOUT (TIMEOUT, after about 3 s); a client whose own timeout fires
    first closes the socket in SYN_SENT (CLOSED)."""
    port, c1, c2 = free_port(), free_port(), free_port()
    with Namespace(port) as ns, Tracer("connect", "-o", "json", "--failed", "-D", str(port)) as conn:
        timed_out = Endpoint("client", "127.0.0.1", port, "--bind-port", c1, "--syncnt", 1, netns=ns.name)
        gave_up = Endpoint("client", "127.0.0.1", port, "--bind-port", c2, "--give-up", 0.3, netns=ns.name)
        assert gave_up.outcome() == "gave-up"
        assert timed_out.outcome() == "timeout"
        assert conn.stop() == 0, conn.stderr
    rows = sorted(conn.json_rows(), key=lambda r: r["lport"])
    assert [(r["pid"], r["lport"], r["rport"], r["result"]) for r in rows] == sorted(
        [(timed_out.pid, c1, port, "TIMEOUT"), (gave_up.pid, c2, port, "CLOSED")], key=lambda r: r[1])
    assert all(r["lat_ms"] > 0 for r in rows)


def test_table_output(bpf):
    closed, cport = free_port(), free_port()
    with Tracer("connect", "-L", str(cport)) as conn:
        assert Endpoint("client", "127.0.0.1", closed, "--bind-port", cport).outcome() == "refused"
        assert conn.stop() == 0
    header, row = conn.stdout.splitlines()
    assert header.split() == ["PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "LAT(ms)", "RESULT"]
    cells = row.split()
    assert cells[2:6] == ["127.0.0.1", str(cport), "127.0.0.1", str(closed)] and cells[7] == "REFUSED"
    assert header.index("RESULT") == row.index("REFUSED")
