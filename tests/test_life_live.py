"""tcptrace life against real sessions (root + BPF).

Byte counts are the kernel's: bytes_acked covers the SYN (connecting side
only: an accepted socket is born after its SYN-ACK was acknowledged) and our
FIN, bytes_received the peer's FIN. The peer's FIN reaches the counters of
the side that closed first only while that side still holds a full socket:
one closed with close() becomes a TIME_WAIT mini-socket as soon as its own
FIN is acknowledged, which may be before the peer's FIN arrives. Exact
counts for both sides therefore use a half-close (shutdown, read to EOF,
close) on the side that closes first.
"""

import contextlib
import io
import json
import os
import random
import socket
import sys
import threading
import time

import pytest

from helpers import Peer, Tracer, session
from netns import RECEIVER_ADDR, SENDER_ADDR, LinkPair
from tcptrace import btf, output, runtime
from tcptrace.tools import life

_HANDED_OUT = set()


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    """A free port below the kernel's ephemeral range, never the same twice:
    other traffic on the machine cannot get it as a client port and slip
    into a test's -L filter."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(1000):
        port = random.randrange(max(1024, low - 12000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise AssertionError("no free port below the ephemeral range")


HOSTS = {"v4": ("127.0.0.1", socket.AF_INET, 4), "v6": ("::1", socket.AF_INET6, 6)}
SIZES = ((0, 0), (100_000, 5_000), (5_000_000, 3_000_000))
PEER_COMM = os.path.basename(sys.executable)[:15]


def client_bytes(client_send, server_send):
    return client_send + 2, server_send + 1


def server_bytes(client_send, server_send):
    return server_send + 1, client_send + 1


def rows_between(rows, port_a, port_b):
    return [r for r in rows if {r["lport"], r["rport"]} == {port_a, port_b}]


def sole(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, f"expected one row with {match}: {rows}"
    return found[0]


def traced_sessions(host, family, half_close, client_first):
    """One session per SIZES entry under one tracer; [(client row, server
    row, client peer, server peer, client_send, server_send)]."""
    pairs = [(free_port(family, host), free_port(family, host)) for _ in SIZES]
    ports = ",".join(str(p) for pair in pairs for p in pair)
    with Tracer("life", "-o", "json", "-L", ports) as t:
        peers = [session(host, sport, cport, client_send=cs, server_send=ss, client_closes=client_first,
                         half_close=half_close)
                 for (sport, cport), (cs, ss) in zip(pairs, SIZES)]
        assert t.stop() == 0, t.stderr
    rows = t.json_rows()
    assert len(rows) == 2 * len(SIZES), rows
    out = []
    for (sport, cport), (cs, ss), (server, client) in zip(pairs, SIZES, peers):
        mine = rows_between(rows, sport, cport)
        out.append((sole(mine, lport=cport), sole(mine, lport=sport), client, server, cs, ss))
    return out


@pytest.mark.parametrize("close_order", ["client-first", "server-first"])
@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_bytes_and_owners(bpf, ip, close_order):
    host, family, version = HOSTS[ip]
    client_first = close_order == "client-first"
    for c, s, client, server, cs, ss in traced_sessions(host, family, True, client_first):
        assert (c["pid"], c["comm"], c["lport"], c["rport"]) == (client.pid, PEER_COMM, c["lport"], s["lport"])
        assert (s["pid"], s["comm"], s["rport"]) == (server.pid, PEER_COMM, c["lport"])
        assert (c["tx_bytes"], c["rx_bytes"]) == client_bytes(cs, ss)
        assert (s["tx_bytes"], s["rx_bytes"]) == server_bytes(cs, ss)
        for r in (c, s):
            assert (r["family"], r["laddr"], r["raddr"]) == (version, host, host)
            assert r["partial"] is False
            assert r["ms"] > 0
            assert "retransmits" not in r  # extended fields only with -x


@pytest.mark.parametrize("close_order", ["client-first", "server-first"])
def test_owners_when_closed_at_once(bpf, close_order):
    """close() without shutdown: the same owners and counts, except for each
    side's view of the other's FIN. The first closer's socket is handed to a
    TIME_WAIT mini-socket once its own FIN is acknowledged, maybe before the
    peer's FIN arrives (then its RX lacks that FIN); and now and then (seen
    on a loaded machine, while that hand-over happens) the second closer's
    socket closes without its FIN counted as acknowledged (then its TX lacks
    its FIN). Both are what the kernel counted; test_bytes_and_owners, where
    the first closer waits for the peer's FIN, asserts the exact counts."""
    client_first = close_order == "client-first"
    for c, s, client, server, cs, ss in traced_sessions("127.0.0.1", socket.AF_INET, False, client_first):
        assert (c["pid"], c["comm"]) == (client.pid, PEER_COMM)
        assert (s["pid"], s["comm"]) == (server.pid, PEER_COMM)
        first, second = (c, s) if client_first else (s, c)
        first_sent, second_sent = (cs + 2, ss + 1) if client_first else (ss + 1, cs + 2)
        first_recv, second_recv = (ss, cs) if client_first else (cs, ss)
        assert first["tx_bytes"] == first_sent
        assert second["tx_bytes"] in (second_sent - 1, second_sent)
        assert second["rx_bytes"] == second_recv + 1
        assert first["rx_bytes"] in (first_recv, first_recv + 1)


def test_pid_filter_catches_connected_and_accepted(bpf):
    """-p <this process>: its connect()ed and its accept()ed sessions, not its peers'."""
    me = os.getpid()
    out_port, out_local = free_port(), free_port()
    in_port, in_remote = free_port(), free_port()
    ports = f"{out_port},{out_local},{in_port},{in_remote}"
    with Tracer("life", "-o", "json", "-p", str(me)) as only_me, \
            Tracer("life", "-o", "json", "-L", ports) as everyone:
        server = Peer("server", "127.0.0.1", out_port, "--recv", 300, "--send", 200)
        with socket.socket() as s:
            s.bind(("127.0.0.1", out_local))
            s.connect(("127.0.0.1", out_port))
            s.sendall(b"x" * 300)
            assert recv_all(s, 200) == 200
        server.wait()

        with socket.socket() as listener:
            listener.bind(("127.0.0.1", in_port))
            listener.listen()
            client = Peer("client", "127.0.0.1", in_port, "--bind-port", in_remote,
                          "--send", 700, "--recv", 400, "--close-first")
            conn, _ = listener.accept()
            with conn:
                assert recv_all(conn, 700) == 700
                conn.sendall(b"y" * 400)
                assert conn.recv(1) == b""
            client.wait()
        for t in (only_me, everyone):
            assert t.stop() == 0, t.stderr

    mine = [r for r in only_me.json_rows() if r["lport"] in (out_local, in_port)]
    assert all(r["pid"] == me for r in only_me.json_rows())
    active = sole(mine, lport=out_local)
    passive = sole(mine, lport=in_port)
    assert (active["rport"], active["tx_bytes"], active["rx_bytes"]) == (out_port, 302, 201)
    assert (passive["rport"], passive["tx_bytes"], passive["rx_bytes"]) == (in_remote, 401, 701)
    # The peers' ends exist and belong to the peers: the filter removed them.
    all_rows = everyone.json_rows()
    assert sole(all_rows, lport=out_port)["pid"] == server.pid
    assert sole(all_rows, lport=in_remote)["pid"] == client.pid
    assert len(all_rows) == 4


def recv_all(sock, n):
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            break
        got += len(chunk)
    return got


def test_session_opened_before_tracing_is_partial(bpf):
    sport, cport = free_port(), free_port()
    listener = socket.socket()
    client = socket.socket()
    try:
        listener.bind(("127.0.0.1", sport))
        listener.listen()
        client.bind(("127.0.0.1", cport))
        client.connect(("127.0.0.1", sport))
        conn, _ = listener.accept()
        client.sendall(b"c" * 1000)
        assert recv_all(conn, 1000) == 1000
        conn.sendall(b"s" * 2000)
        assert recv_all(client, 2000) == 2000
        with Tracer("life", "-x", "-o", "json", "-L", f"{sport},{cport}") as t:
            client.close()
            assert conn.recv(1) == b""
            conn.close()
            listener.close()  # a listener is not a session, seen whole or not
            assert t.stop() == 0, t.stderr
    finally:
        for s in (client, listener):
            s.close()
    rows = t.json_rows()
    assert len(rows) == 2, rows
    c = sole(rows, lport=cport)
    s = sole(rows, lport=sport)
    for r in (c, s):
        assert r["partial"] is True
        assert r["pid"] == os.getpid()
        assert r["connect_ms"] is None  # the handshake was not seen
        assert r["ms"] >= 0
    assert (c["tx_bytes"], c["rx_bytes"], c["closed_by"]) == (1002, 2001, "local")
    assert (s["tx_bytes"], s["rx_bytes"], s["closed_by"]) == (2001, 1001, "remote")


def test_table_reads_like_tcplife(bpf):
    sport, cport = free_port(), free_port()
    with Tracer("life", "-L", f"{sport},{cport}") as t:
        server, client = session("127.0.0.1", sport, cport, client_send=100_000, server_send=5_000)
        assert t.stop() == 0, t.stderr
    lines = t.stdout.splitlines()
    assert lines[0].split() == ["PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "TX_KB", "RX_KB", "MS"]
    assert len(lines) == 3
    by_port = {int(line.split()[3]): line.split() for line in lines[1:]}
    assert by_port[cport][:8] == [str(client.pid), PEER_COMM, "127.0.0.1", str(cport), "127.0.0.1",
                                  str(sport), str(100_002 // 1024), str(5_001 // 1024)]
    assert by_port[sport][:8] == [str(server.pid), PEER_COMM, "127.0.0.1", str(sport), "127.0.0.1",
                                  str(cport), str(5_001 // 1024), str(100_001 // 1024)]
    for line in lines:
        assert len(line) <= 80
    for cells in by_port.values():
        assert len(cells) == 9 and float(cells[8]) > 0


def test_extended_reset_and_clean_close(bpf):
    """A refused connect is closed by a reset; a clean session by its first FIN."""
    closed, local = free_port(), free_port()
    sport, cport = free_port(), free_port()
    with Tracer("life", "-x", "-o", "json", "-L", f"{local},{sport},{cport}") as t:
        with socket.socket() as s:
            s.bind(("127.0.0.1", local))
            with pytest.raises(ConnectionRefusedError):
                s.connect(("127.0.0.1", closed))
        server, client = session("127.0.0.1", sport, cport, client_send=10, server_send=20,
                                 client_closes=False)
        assert t.stop() == 0, t.stderr
    rows = t.json_rows()
    assert len(rows) == 3, rows
    refused = sole(rows, lport=local)
    assert (refused["pid"], refused["rport"], refused["closed_by"]) == (os.getpid(), closed, "reset")
    assert (refused["tx_bytes"], refused["rx_bytes"], refused["retransmits"]) == (0, 0, 0)
    assert refused["connect_ms"] is not None and refused["connect_ms"] >= 0
    c = sole(rows, lport=cport)
    s = sole(rows, lport=sport)
    assert (c["pid"], c["closed_by"], c["tx_bytes"], c["rx_bytes"]) == (client.pid, "remote", 12, 21)
    assert (s["pid"], s["closed_by"], s["tx_bytes"], s["rx_bytes"]) == (server.pid, "local", 21, 11)
    for r in (c, s):
        assert r["connect_ms"] is not None and 0 <= r["connect_ms"] <= r["ms"]
        assert isinstance(r["retransmits"], int)


def wait_until_closed(link, ns, port, limit_s=60):
    """Until no socket of `port` in namespace `ns` is open but TIME_WAIT ones."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        out = link.ns(ns, "ss", "-Htan", f"sport = :{port} or dport = :{port}").stdout
        if all(line.split()[0] == "TIME-WAIT" for line in out.splitlines() if line.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"sockets of port {port} still open in {ns}: {out}")


def test_extended_counts_retransmits(bpf):
    """Real loss (nftables drops on the receiver's input) makes real retransmits."""
    size = 3_000_000
    sport = free_port()
    with LinkPair() as link:
        # The client's port is the kernel's choice (peer.py binds only on
        # loopback): its row is found by the namespace addresses instead.
        with Tracer("life", "-x", "-o", "json", "-4") as t:
            link.lose_tcp(link.receiver, f"ip saddr {SENDER_ADDR}")
            sent_before = link.retrans_segs(link.sender)
            recv_before = link.retrans_segs(link.receiver)
            server = link.peer(link.receiver, "server", RECEIVER_ADDR, sport, "--recv", size)
            client = link.peer(link.sender, "client", RECEIVER_ADDR, sport,
                               "--send", size, "--close-first", "--half-close", "--timeout", "60")
            for proc in (client, server):
                _out, err = proc.communicate(timeout=90)
                assert proc.returncode == 0, err
            # An orphaned socket in LAST_ACK may still retransmit its FIN.
            for ns in (link.sender, link.receiver):
                wait_until_closed(link, ns, sport)
            sent_segs = link.retrans_segs(link.sender) - sent_before
            recv_segs = link.retrans_segs(link.receiver) - recv_before
            link.clear_rules(link.receiver)
            assert t.stop() == 0, t.stderr
    rows = [r for r in t.json_rows() if {r["laddr"], r["raddr"]} == {SENDER_ADDR, RECEIVER_ADDR}
            and sport in (r["lport"], r["rport"])]
    assert len(rows) == 2, rows
    c = sole(rows, rport=sport, laddr=SENDER_ADDR)
    s = sole(rows, lport=sport, laddr=RECEIVER_ADDR, rport=c["lport"])
    assert c["pid"] == client.pid and s["pid"] == server.pid
    assert 0 < c["retransmits"] <= sent_segs
    assert 0 <= s["retransmits"] <= recv_segs
    assert (c["closed_by"], s["closed_by"]) == ("local", "remote")
    assert (c["tx_bytes"], c["rx_bytes"]) == (size + 2, 1)
    assert (s["tx_bytes"], s["rx_bytes"]) == (1, size + 1)
    assert c["connect_ms"] is not None and s["connect_ms"] is not None


# -- in-process runs: the maps and the build itself --------------------------

MAPS = ("sessions", "owners", "listen_owners")


class InProcess:
    """The tool's runtime in this process, so a test can look into its maps
    while the program is still loaded. run() polls (in this, the main,
    thread: it handles signals) until max_events rows arrived, while
    `traffic` runs in a thread."""

    def __init__(self, **opts):
        self.buffer = io.StringIO()
        self.opts = runtime.RunOptions(output="json", duration=60, **opts)
        writer = output.writer("json", self.buffer, life.SPEC.columns, extended=self.opts.extended)
        self.session = runtime.Session(life.SPEC, self.opts, writer, err=io.StringIO())

    def __enter__(self):
        self.session.open()
        return self

    def __exit__(self, *exc):
        self.session.close()
        return False

    def run(self, traffic):
        failure = []

        def guarded():
            try:
                traffic()
            except BaseException as e:  # re-raised in the test's thread
                failure.append(e)

        worker = threading.Thread(target=guarded)
        worker.start()
        try:
            assert self.session.run() == 0
        finally:
            worker.join(60)
        if failure:
            raise failure[0]
        return [json.loads(line) for line in self.buffer.getvalue().splitlines()]

    def size(self, name):
        return len(list(self.session.map(name).items()))


def test_maps_return_to_their_size(bpf):
    """Many sessions (closed, aborted, refused) on many listeners leave no
    state behind.

    All sessions are open at once before any closes, so that a leaked entry
    cannot hide behind a later socket that reuses its address. Only IPv6 is
    tracked here (-6 is checked before any state is kept); other IPv6 traffic
    on the machine may hold a few entries at the moment of counting, while a
    leak of one entry per socket would be far above the slack.
    """
    listeners, per_listener = 40, 5
    ports = [free_port(socket.AF_INET6, "::1") for _ in range(listeners)]
    me = os.getpid()

    def traffic():
        with contextlib.ExitStack() as stack:
            pairs = []
            for port in ports:
                listener = stack.enter_context(socket.socket(socket.AF_INET6))
                listener.bind(("::1", port))
                listener.listen()
                for _ in range(per_listener):
                    c = stack.enter_context(socket.create_connection(("::1", port)))
                    conn = stack.enter_context(listener.accept()[0])
                    c.sendall(b"z" * 10)
                    pairs.append((c, conn))
            for i, (c, conn) in enumerate(pairs):
                if i % 2:
                    recv_all(conn, 10)  # a FIN close; unread data makes an abort
                conn.close()
                c.close()
        for port in ports:
            with socket.socket(socket.AF_INET6) as s:
                with pytest.raises(ConnectionRefusedError):
                    s.connect(("::1", port))

    with InProcess(extended=True, family=socket.AF_INET6, lports=tuple(ports),
                   max_events=listeners * per_listener) as run:
        before = {m: run.size(m) for m in MAPS}
        rows = run.run(traffic)
        after = {m: run.size(m) for m in MAPS}
        run.session.read_stats()
        assert run.session.losses.untracked == 0
    assert len(rows) == listeners * per_listener
    assert {r["pid"] for r in rows} == {me}
    assert {r["lport"] for r in rows} == set(ports)
    assert all(r["family"] == 6 and not r["partial"] and r["closed_by"] == "local" for r in rows)
    for m in MAPS:
        assert after[m] <= before[m] + 50, (m, before, after)


def test_without_btf_bytes_are_unknown(bpf, monkeypatch):
    monkeypatch.setattr(btf, "kernel_offsets", lambda struct, members: None)
    sport, cport = free_port(), free_port()
    with InProcess(lports=(sport, cport), max_events=2) as run:
        assert "#define OFF_TCP_SOCK" not in run.session.plan.text
        rows = run.run(lambda: session("127.0.0.1", sport, cport, client_send=1000, server_send=1000))
    assert len(rows) == 2, rows
    for r in rows:
        assert r["tx_bytes"] is None and r["rx_bytes"] is None
        assert r["pid"] > 0
