"""tcptrace exporter against real traffic (root + BPF).

The exporter runs as a subprocess on a free loopback port, known traffic
is made (sessions between two processes, a refused connect, packet loss in
private namespaces), /metrics is scraped and parsed as Prometheus parses
it, and the counters must have moved by exactly what was done: the port
filters (-L/-D) keep other traffic on this machine out. The kernel's own
counters (nstat) and tcptrace's event tools, run alongside, are the
references.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from endpoint import Endpoint
from helpers import ROOT, Tracer, free_port, tcptrace_cmd
from netns import RECEIVER_ADDR, SENDER_ADDR, LinkPair
from test_probe_live import Transfer
from test_retrans_live import CLIENT_STATES, Processes, nstat, pin_client_port, ports, settle, wait_for
from tcptrace import exporter, tracefs

READY_TIMEOUT = 60
N = 5  # sessions
SIZE = 1000  # bytes each client sends: bytes_acked counts SYN and FIN too, 1002 (bucket le=1024)
LOSS_SIZE = 2_000_000
PROGRAMS = 8  # one per tracepoint: inet_sock_set_state, six tcp:*, skb:kfree_skb (6.18)


class Exporter:
    """`tcptrace exporter` in a subprocess on a free loopback port."""

    def __init__(self, *args, port=None):
        self.args = list(args)
        self.port = port or free_port()
        self.stderr_lines = []
        self.returncode = None
        self._ready = threading.Event()

    def __enter__(self):
        self.proc = subprocess.Popen(
            tcptrace_cmd("exporter", "--listen", f"127.0.0.1:{self.port}", "--verbose", *self.args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._ready.wait(READY_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"the exporter did not start: {self.stderr}")
        return self

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "serving metrics on" in line:
                self._ready.set()
        self._ready.set()

    @property
    def stderr(self):
        return "".join(self.stderr_lines)

    def text(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            assert r.status == 200
            return r.read().decode()

    def scrape(self):
        """{(sample name, ((label, value), ...)): value}, as Prometheus reads it."""
        out = {}
        for family in text_string_to_metric_families(self.text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self, sig=signal.SIGTERM):
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
            self._reader.join(10)
            self.stdout = self.proc.stdout.read()
            self.returncode = self.proc.returncode
        return self.returncode

    def __exit__(self, *exc):
        self.stop()
        return False


def series(samples, name):
    """{labels dict as a tuple of pairs: value} of one sample name, the
    series served at 0 before any event left out."""
    return {labels: value for (n, labels), value in samples.items() if n == name and value}


def by_label(samples, name, label):
    return {dict(labels)[label]: value for labels, value in series(samples, name).items()}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def transitions(samples):
    return {(dict(l)["from"], dict(l)["to"]): v for l, v in series(samples, "tcptrace_tcp_state_transitions_total").items()}


def served(samples, name):
    """Every series of one sample name, those at 0 included."""
    return {labels: value for (n, labels), value in samples.items() if n == name}


def bucket(samples, name, le):
    return samples[(name + "_bucket", (("le", le),))]


def settled(exporter, done, what):
    """Scrape until `done(samples)`, then once more: exact counts must not move on."""
    wait_for(lambda: done(exporter.scrape()), what)
    time.sleep(0.5)
    return exporter.scrape()


def kernel_reason(name):
    fmt = tracefs.FormatSource(tracefs.ensure_mounted()).load("tcp:tcp_send_reset")
    return name if fmt.has("reason") else "none"


def test_sessions_connects_and_resets_on_loopback(bpf):
    """N sessions to one port and a refused connect. One exporter counts the
    clients (-D), one the refused connect's two ports (-L), one everything;
    `tcptrace life`, alongside, gives the sessions' exact bytes."""
    sport, closed, cport = free_port(), free_port(), free_port()
    with Exporter("-D", str(sport)) as clients, Exporter("-L", f"{closed},{cport}") as refused, \
            Exporter() as everything, Tracer("life", "-o", "json", "-D", str(sport)) as life:
        server = Endpoint("server", "127.0.0.1", sport, "--accept", N)
        for _ in range(N):
            assert Endpoint("client", "127.0.0.1", sport, "--send", SIZE, "--close-first").outcome() == "ok"
        server.outcome()
        assert Endpoint("client", "127.0.0.1", closed, "--bind-port", cport).outcome() == "refused"

        c = settled(clients, lambda s: s.get(("tcptrace_tcp_session_duration_seconds_count", ())) == N,
                    "the clients' sessions to close")
        r = settled(refused, lambda s: value(s, "tcptrace_tcp_connects_total", result="REFUSED") == 1,
                    "the refused connect")
        e = everything.scrape()
        assert life.stop() == 0, life.stderr
    for exp in (clients, refused, everything):
        assert exp.stop() == 0, exp.stderr
        assert "Traceback" not in exp.stderr and exp.stdout == ""

    # The clients: every session's changes, its connect, its lifespan and bytes.
    moves = transitions(c)
    assert moves[("CLOSE", "SYN_SENT")] == moves[("SYN_SENT", "ESTABLISHED")] == N
    assert moves[("ESTABLISHED", "FIN_WAIT1")] == N  # the clients close first
    assert sum(v for (old, new), v in moves.items() if new == "CLOSE") == N
    assert by_label(c, "tcptrace_tcp_connects_total", "result") == {"OK": N}
    assert series(c, "tcptrace_tcp_resets_total") == {}
    rows = life.json_rows()
    assert len(rows) == N
    sent, received = "tcptrace_tcp_session_sent_bytes", "tcptrace_tcp_session_received_bytes"
    assert c[(sent + "_count", ())] == c[(received + "_count", ())] == N
    assert c[(sent + "_sum", ())] == sum(r["tx_bytes"] for r in rows) == N * (SIZE + 2)
    assert c[(received + "_sum", ())] == sum(r["rx_bytes"] for r in rows)
    assert bucket(c, sent, "512.0") == 0 and bucket(c, sent, "1024.0") == N
    duration = "tcptrace_tcp_session_duration_seconds"
    assert bucket(c, duration, "+Inf") == N and 0 < c[(duration + "_sum", ())] <= sum(r["ms"] for r in rows) / 1e3 + 1

    # The refused connect: a reset sent for no socket, received in SYN_SENT.
    assert series(r, "tcptrace_tcp_resets_total") == {
        (("direction", "sent"), ("reason", kernel_reason("NO_SOCKET"))): 1,
        (("direction", "received"), ("reason", "none")): 1,
    }
    assert by_label(r, "tcptrace_tcp_connects_total", "result") == {"REFUSED": 1}
    assert transitions(r) == {("CLOSE", "SYN_SENT"): 1, ("SYN_SENT", "CLOSE"): 1}
    # It was born and closed: a session of its own, which never moved a byte.
    assert r[(duration + "_count", ())] == 1 and r[(sent + "_sum", ())] == 0

    # Unfiltered: at least all of the above (the machine has other traffic).
    assert transitions(e)[("CLOSE", "SYN_SENT")] >= N + 1
    assert value(e, "tcptrace_tcp_connects_total", result="OK") >= N
    assert value(e, "tcptrace_tcp_connects_total", result="REFUSED") >= 1
    assert value(e, "tcptrace_tcp_resets_total", direction="sent", reason=kernel_reason("NO_SOCKET")) >= 1

    for s in (c, r, e):
        assert s[("tcptrace_up", ())] == 1 and s[("tcptrace_programs_loaded", ())] == PROGRAMS
        assert s[("tcptrace_lost_events_total", ())] == 0 and s[("tcptrace_untracked_sockets_total", ())] == 0
        assert set(by_label(s, "tcptrace_tracepoint_attached", "tracepoint").values()) == {1}


def test_retransmits_under_loss(bpf):
    """20% of the client's packets dropped by the receiver: the exporter's
    retransmits equal what `tcptrace retrans -c` counted for the client's
    port, at most the segments the kernel sent again."""
    sport, cport = ports()
    with LinkPair() as link, Processes(link) as procs:
        pin_client_port(link, cport)
        link.lose_tcp(link.receiver, f"ip saddr {SENDER_ADDR}")
        before = link.retrans_segs(link.sender)
        with Exporter("-L", str(cport)) as exp, Tracer("retrans", "-c", "-o", "json", "-L", str(cport)) as counts:
            server = procs.peer(link.receiver, "server", RECEIVER_ADDR, sport, "--recv", LOSS_SIZE)
            client = procs.peer(link.sender, "client", RECEIVER_ADDR, sport, "--send", LOSS_SIZE, "--close-first")
            procs.finish(client)
            procs.finish(server)
            settle(link)
            samples = exp.scrape()
            assert counts.stop() == 0, counts.stderr
        assert exp.returncode == 0, exp.stderr
        sent_again = link.retrans_segs(link.sender) - before

    by_state = by_label(samples, "tcptrace_tcp_retransmits_total", "state")
    total = sum(by_state.values())
    assert 1 <= total <= sent_again
    assert set(by_state) <= CLIENT_STATES
    assert total == sum(r["count"] for r in counts.json_rows() if r["type"] == "retrans")
    assert value(samples, "tcptrace_tcp_synack_retransmits_total") == 0
    assert value(samples, "tcptrace_tcp_connects_total", result="OK") == 1
    # The client's congestion states, from Open: each change leaves the state
    # the previous one entered, so the changes make one path, and loss made one.
    moves = {(dict(l)["from"], dict(l)["to"]): v
             for l, v in series(samples, "tcptrace_tcp_congestion_state_transitions_total").items()}
    assert moves and sum(v for (old, _new), v in moves.items() if old == "Open") >= 1, moves
    assert set(s for move in moves for s in move) <= {"Open", "Disorder", "CWR", "Recovery", "Loss"}
    names = {s for move in moves for s in move}
    balance = {n: sum(v for (_o, new), v in moves.items() if new == n) -
               sum(v for (old, _n), v in moves.items() if old == n) for n in names}
    ends = [n for n, b in balance.items() if b]
    assert all(b in (-1, 0, 1) for b in balance.values()) and (
        not ends or (balance["Open"] == -1 and len(ends) == 2)), moves
    assert len(served(samples, "tcptrace_tcp_congestion_state_transitions_total")) == 20


@contextlib.contextmanager
def ftrace_srtts(port):
    """An ftrace instance of its own recording tcp:tcp_probe towards one
    port: yields a function giving the srtt of every hit so far."""
    inst = os.path.join(tracefs.find_mount(), "instances", f"tcptrace-exporter-{os.getpid()}")
    os.mkdir(inst)
    event = os.path.join(inst, "events", "tcp", "tcp_probe")
    try:
        with open(os.path.join(inst, "buffer_size_kb"), "w") as f:
            f.write("16384")
        with open(os.path.join(event, "filter"), "w") as f:
            f.write(f"dport == {port}")
        with open(os.path.join(event, "enable"), "w") as f:
            f.write("1")

        def srtts():
            with open(os.path.join(inst, "trace")) as f:
                text = f.read()
            written = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
            assert written and written.group(1) == written.group(2), "the ftrace buffer overran"
            values = [int(v) for v in re.findall(r" srtt=(\d+) ", text)]
            assert len(values) == int(written.group(2))
            return values

        yield srtts
    finally:
        with open(os.path.join(event, "enable"), "w") as f:
            f.write("0")
        os.rmdir(inst)


def test_srtt_histogram_against_ftrace(bpf):
    """A paced bulk transfer on loopback: the histogram of the client's
    smoothed RTTs (-D: probes towards the server's port) holds exactly the
    values an ftrace instance recorded for the same tracepoint and port."""
    port = free_port()
    with ftrace_srtts(port) as srtts, Exporter("-D", str(port)) as exp:
        transfer = Transfer(3_000_000, pace_s=0.002)
        transfer.port = port
        transfer.start()
        transfer.done()
        values = srtts()
        rtt = "tcptrace_tcp_srtt_seconds"
        samples = settled(exp, lambda s: s.get((rtt + "_count", ())) == len(values), "every probe")
        assert srtts() == values  # nothing more arrived
    assert exp.returncode == 0 and "Traceback" not in exp.stderr
    assert len(values) > 20
    assert samples[(rtt + "_sum", ())] == pytest.approx(sum(values) * 1e-6)
    for k in exporter.SRTT_POWERS:
        le = floatToGoString((1 << k) * 1e-6)
        assert bucket(samples, rtt, le) == sum(1 for v in values if v <= 1 << k), le
    assert bucket(samples, rtt, "+Inf") == len(values)


def test_synack_retransmits(bpf):
    """The handshake's last ACK dropped until the listener sent its SYN-ACK
    again: one count per SYN-ACK the kernel says it sent again."""
    sport, cport = ports()
    with LinkPair() as link, Processes(link) as procs:
        pin_client_port(link, cport)
        before = nstat(link, link.receiver, "TcpExtTCPSynRetrans")
        with Exporter("-L", str(sport)) as exp:
            server = procs.peer(link.receiver, "server", RECEIVER_ADDR, sport, "--recv", 1000)
            link.drop_input(link.receiver, f"ip saddr {SENDER_ADDR} tcp dport {sport} tcp flags & syn == 0")
            client = procs.peer(link.sender, "client", RECEIVER_ADDR, sport, "--send", 1000, "--close-first")
            wait_for(lambda: nstat(link, link.receiver, "TcpExtTCPSynRetrans") > before, "a SYN-ACK retransmit")
            link.clear_rules(link.receiver)
            procs.finish(client)
            procs.finish(server)
            settle(link)
            samples = exp.scrape()
        synacks = nstat(link, link.receiver, "TcpExtTCPSynRetrans") - before
    assert samples[("tcptrace_tcp_synack_retransmits_total", ())] == synacks >= 1
    # The listener's child was established once its ACK got through.
    assert transitions(samples)[("SYN_RECV", "ESTABLISHED")] == 1


def test_top_remotes(bpf):
    """Per remote address, only with --top-remotes K, and K series at most."""
    sport = free_port()
    with Exporter("-L", str(sport), "--top-remotes", "1") as one, \
            Exporter("-L", str(sport), "--top-remotes", "2") as two, Exporter("-L", str(sport)) as none:
        for host, count in (("127.0.0.1", 3), ("::1", 1)):
            server = Endpoint("server", host, sport, "--accept", count)
            for _ in range(count):
                assert Endpoint("client", host, sport, "--close-first").outcome() == "ok"
            server.outcome()
        done = lambda s: value(s, "tcptrace_remote_connections_total", remote="::1") == 1  # noqa: E731
        top2 = settled(two, done, "the connections")
        top1, plain = one.scrape(), none.scrape()
    assert by_label(top2, "tcptrace_remote_connections_total", "remote") == {"127.0.0.1": 3, "::1": 1}
    assert by_label(top1, "tcptrace_remote_connections_total", "remote") == {"127.0.0.1": 3}
    assert not any(name.startswith("tcptrace_remote_") for name, _labels in plain)
    assert value(plain, "tcptrace_tcp_state_transitions_total", **{"from": "SYN_RECV", "to": "ESTABLISHED"}) == 4


def bpf_programs_of(pid):
    """IDs of the BPF programs a process holds, from its fds' fdinfo."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids.update(int(line.split()[1]) for line in f if line.startswith("prog_id:"))
        except OSError:
            continue
    return ids


def test_restarts_cleanly(bpf):
    """SIGTERM ends it with status 0 and unloads its programs; a second
    start on the same port serves again; SIGINT and SIGHUP end it too."""
    port = free_port()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with Exporter(port=port) as exp:
            programs = bpf_programs_of(exp.proc.pid)
            assert len(programs) == PROGRAMS
            assert value(exp.scrape(), "tcptrace_up") == 1
            assert exp.stop(sig) == 0, exp.stderr
        assert "Traceback" not in exp.stderr
        remaining = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                                              check=True).stdout or "[]")
        assert not programs & {p["id"] for p in remaining}, "programs stayed loaded after exit"
    with socket.socket() as s:  # nothing listens there any more (TIME_WAIT may remain)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_port_in_use_fails_before_loading(bpf):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(tcptrace_cmd("exporter", "--listen", f"127.0.0.1:{port}", "--verbose"),
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"tcptrace: cannot listen on 127.0.0.1:{port} (Address already in use): pick another with --listen."]


def test_not_root_is_a_privilege_error(bpf):
    port = free_port()
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           *tcptrace_cmd("exporter", "--listen", f"127.0.0.1:{port}")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=dict(os.environ))
    assert proc.returncode == 4, proc.stderr
    assert "CAP_BPF" in proc.stderr and "Traceback" not in proc.stderr


# -- series known in advance, and drops by the kernel's reason ------------------------


def live_table(tracepoint):
    fmt = tracefs.FormatSource(tracefs.ensure_mounted()).load(tracepoint)
    return fmt.symbols.get("reason", {}) if fmt else {}


def test_known_series_exist_at_zero_from_the_first_scrape(bpf):
    """Before any event (a port nothing uses): every state change the kernel
    makes, this kernel's reset and drop reasons, the connect results and the
    retransmit states are served, at 0."""
    from tcptrace import exporter

    with Exporter("-L", str(free_port())) as exp:
        first = exp.scrape()
    assert exp.returncode == 0, exp.stderr
    assert served(first, "tcptrace_tcp_state_transitions_total") == {
        (("from", a), ("to", b)): 0 for a, b in exporter.TRANSITIONS}
    assert served(first, "tcptrace_tcp_retransmits_total") == {(("state", s),): 0 for s in exporter.RETRANSMIT_STATES}
    assert served(first, "tcptrace_tcp_connects_total") == {(("result", r),): 0 for r in exporter.CONNECT_RESULTS}
    resets = live_table("tcp:tcp_send_reset")
    sent = [n for n in resets.values() if n != "MAX"] or ["none"]
    assert served(first, "tcptrace_tcp_resets_total") == {
        **{(("direction", "sent"), ("reason", n)): 0 for n in sent}, (("direction", "received"), ("reason", "none")): 0}
    reasons = live_table("skb:kfree_skb")
    skip = {n: r for r, n in reasons.items()}["NOT_SPECIFIED"]
    expected = {(("reason", n),): 0 for r, n in reasons.items() if r > skip and n != "MAX"}
    assert served(first, "tcptrace_tcp_drops_total") == expected and len(expected) > 50


def test_drops_no_socket_on_loopback(bpf):
    """SYNs to a closed port, IPv4 and IPv6: one NO_SOCKET drop each, as
    `tcptrace drops -c` counts them in the same run."""
    closed = free_port()
    with socket.socket(socket.AF_INET6) as s:  # the same port free on ::1 too
        s.bind(("::1", closed))
    with Exporter("-L", str(closed)) as exp, Tracer("drops", "-c", "-o", "json", "-L", str(closed)) as counts:
        for host, times in (("127.0.0.1", 3), ("::1", 2)):
            for _ in range(times):
                assert Endpoint("client", host, closed).outcome() == "refused"
        samples = settled(exp, lambda s: value(s, "tcptrace_tcp_drops_total", reason="NO_SOCKET") == 5,
                          "the NO_SOCKET drops")
        assert counts.stop() == 0, counts.stderr
    assert exp.returncode == 0 and "Traceback" not in exp.stderr
    assert by_label(samples, "tcptrace_tcp_drops_total", "reason") == {"NO_SOCKET": 5}
    assert counts.json_rows() == [{"reason": "NO_SOCKET", "lport": None, "count": 5}]
    assert samples[("tcptrace_lost_events_total", ())] == 0


def test_drops_netfilter_in_a_namespace(bpf):
    """An nftables rule drops every SYN to a port: one NETFILTER_DROP per
    SYN the client sent (the first and its retries, nstat's TCPSynRetrans),
    and none counted for other ports (-L)."""
    port, other = ports()
    with LinkPair() as link:
        link.drop_input(link.receiver, f"tcp dport {port}")
        before = nstat(link, link.sender, "TcpExtTCPSynRetrans")
        with Exporter("-L", str(port)) as exp, Exporter("-L", str(other)) as elsewhere, \
                Tracer("drops", "-c", "-o", "json", "-L", str(port)) as counts:
            client = Endpoint("client", RECEIVER_ADDR, port, "--syncnt", 1, "--give-up", 2.5, netns=link.sender)
            assert client.outcome() in ("timeout", "gave-up")
            syns = 1 + nstat(link, link.sender, "TcpExtTCPSynRetrans") - before
            samples = settled(exp, lambda s: value(s, "tcptrace_tcp_drops_total", reason="NETFILTER_DROP") == syns,
                              "the NETFILTER_DROP drops")
            assert counts.stop() == 0, counts.stderr
            others = elsewhere.scrape()
    assert syns >= 2
    assert by_label(samples, "tcptrace_tcp_drops_total", "reason") == {"NETFILTER_DROP": syns}
    assert counts.json_rows() == [{"reason": "NETFILTER_DROP", "lport": None, "count": syns}]
    assert by_label(others, "tcptrace_tcp_drops_total", "reason") == {}
