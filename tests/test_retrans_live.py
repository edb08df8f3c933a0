"""tcptrace retrans against real packet loss (root + BPF).

Loss is real: two private network namespaces joined by a veth, and an
nftables rule on the receiver's input hook that drops the sender's packets
(tests/netns.py). The kernel's own counters (nstat, in each namespace) are
the reference for how many retransmits there were.
"""

import collections
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

import helpers
from helpers import PEER, Tracer
from test_workload_live import own_workload
from netns import RECEIVER_ADDR, SENDER_ADDR, LinkPair
from tcptrace import runtime

SIZE = 3_000_000  # bytes: at 20% loss, a few dozen retransmit events
V6 = ("2001:db8:18::1", "2001:db8:18::2")  # documentation prefix, only inside the namespaces
HOSTS = {"v4": (SENDER_ADDR, RECEIVER_ADDR, "ip", 4), "v6": (*V6, "ip6", 6)}

# The states in which each side of these sessions can have something to send again.
CLIENT_STATES = {"SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "CLOSING"}
SERVER_STATES = {"SYN_RECV", "LAST_ACK"}  # the server only sends its SYN-ACK and its FIN


def ports():
    rng = random.SystemRandom()
    return rng.randrange(20000, 30000), rng.randrange(40000, 50000)


def nstat(link, ns, name):
    out = link.ns(ns, "nstat", "-az", name).stdout
    for line in out.splitlines():
        if line.startswith(name + " "):
            return int(line.split()[1])
    raise AssertionError(f"nstat has no {name}: {out}")


def wait_for(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def pin_client_port(link, port):
    """The sender's only ephemeral port, so the client's 4-tuple is known
    before it connects (both families take it from the ipv4 sysctl)."""
    link.ns(link.sender, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={port} {port}")


def add_ipv6(link):
    for ns, dev, addr in ((link.sender, link.veth_s, V6[0]), (link.receiver, link.veth_r, V6[1])):
        link.ns(ns, "ip", "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")


def settle(link):
    """Until no connection in either namespace can still retransmit."""

    def quiet():
        for ns in (link.sender, link.receiver):
            for line in link.ns(ns, "ss", "-Htan").stdout.splitlines():
                if line.split() and line.split()[0] != "TIME-WAIT":
                    return False
        return True

    wait_for(quiet, "the connections to close")


class Processes:
    """Peers in the namespaces; whatever is still running at exit is killed."""

    def __init__(self, link):
        self.link = link
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        return False

    def peer(self, ns, role, host, port, *extra):
        proc = self.link.peer(ns, role, host, port, *extra)
        self.procs.append(proc)
        return proc

    def held(self, ns, role, host, port, *extra):
        """A peer that waits for go() before it starts, so its PID can be
        given to -p first. `ip netns exec`, sh and python exec one another:
        the PID stays the Popen's."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sh", "-c", 'read go && exec "$@"', "sh",
             sys.executable, PEER, role, host, str(port), *map(str, extra)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        proc.role = role
        self.procs.append(proc)
        return proc

    @staticmethod
    def go(proc):
        proc.stdin.write("go\n")
        proc.stdin.close()
        proc.stdin = None  # communicate() would flush it again
        if proc.role == "server":
            line = proc.stdout.readline()
            assert "listening" in line, proc.stderr.read()

    @staticmethod
    def finish(proc):
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err


def kernel_reports_failed_attempts():
    """Whether this kernel's tcp_retransmit_skb has `err` (6.18 does, 6.8 not)."""
    return runtime.formats_source().load("tcp:tcp_retransmit_skb").has("err")


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def count_key(row):
    return (row["family"], row["laddr"], row["lport"], row["raddr"], row["rport"], row["type"])


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_data_retransmits_under_loss(bpf, ip):
    """20% of the client's packets dropped: every row is this connection's,
    owned by the right process, no more rows than the kernel counted
    retransmitted segments, and -c (at exit, and per interval) counts exactly
    the rows seen."""
    sender_addr, receiver_addr, proto, version = HOSTS[ip]
    sport, cport = ports()
    both = f"{sport},{cport}"
    with LinkPair() as link, Processes(link) as procs:
        if ip == "v6":
            add_ipv6(link)
        pin_client_port(link, cport)
        link.lose_tcp(link.receiver, f"{proto} saddr {sender_addr}")
        client = procs.held(link.sender, "client", receiver_addr, sport, "--send", SIZE, "--close-first")
        segs = {ns: link.retrans_segs(ns) for ns in (link.sender, link.receiver)}
        with Tracer("retrans", "-o", "json", "-L", both) as events, \
                Tracer("retrans", "-c", "-o", "json", "-L", both) as counts, \
                Tracer("retrans", "-c", "-i", "0.5", "-o", "json", "-L", both) as intervals, \
                Tracer("retrans", "-o", "json", "-p", str(client.pid)) as by_pid, \
                (Tracer("retrans", "--failed", "-o", "json", "-L", both) if kernel_reports_failed_attempts()
                 else contextlib.nullcontext()) as failed:
            fails = nstat(link, link.sender, "TcpExtTCPRetransFail")
            server = procs.peer(link.receiver, "server", receiver_addr, sport, "--recv", SIZE)
            procs.go(client)
            procs.finish(client)
            procs.finish(server)
            settle(link)
            for t in (events, counts, intervals, by_pid, failed):
                assert t is None or t.stop() == 0, t.stderr
        sent_again = {ns: link.retrans_segs(ns) - segs[ns] for ns in segs}
        fails = nstat(link, link.sender, "TcpExtTCPRetransFail") - fails

    rows = events.json_rows()
    client_rows = [r for r in rows if r["lport"] == cport]
    server_rows = [r for r in rows if r["lport"] == sport]
    assert len(client_rows) + len(server_rows) == len(rows)
    # One event may cover several segments (GSO): at least one, at most the segments.
    assert 1 <= len(client_rows) <= sent_again[link.sender]
    assert len(server_rows) <= sent_again[link.receiver]
    for r in client_rows:
        assert r["state"] in CLIENT_STATES, r
        assert {k: r[k] for k in ("pid", "family", "laddr", "raddr", "rport", "type", "err")} == {
            "pid": client.pid, "family": version, "laddr": sender_addr, "raddr": receiver_addr,
            "rport": sport, "type": "retrans", "err": 0}
        assert r["comm"].startswith("python")
    for r in server_rows:
        assert (r["type"], r["state"]) in {("synack", "SYN_RECV"), ("retrans", "LAST_ACK")}, r
        assert (r["pid"], r["laddr"], r["raddr"], r["rport"]) == (server.pid, receiver_addr, sender_addr, cport)

    expected = collections.Counter(count_key(r) for r in rows)
    totals = counts.json_rows()
    assert {count_key(c): c["count"] for c in totals} == expected
    assert [c["count"] for c in totals] == sorted((c["count"] for c in totals), reverse=True)
    per_interval = collections.Counter()
    for c in intervals.json_rows():
        per_interval[count_key(c)] += c["count"]
    assert per_interval == expected

    assert without_time(by_pid.json_rows()) == without_time(client_rows)

    if failed:
        # Attempts that sent nothing, with their errno; the kernel's counter
        # of them leaves out -EBUSY (a copy of the segment still queued).
        failures = [r for r in failed.json_rows() if r["lport"] == cport]
        assert len(failures) >= fails
        assert all(r["err"] < 0 and r["pid"] == client.pid for r in failures), failures


def test_synack_retransmits_name_the_listener(bpf):
    """The handshake's last ACK dropped until the server has sent its
    SYN-ACK again: one `synack` row per SYN-ACK the kernel counted, owned by
    the listening process."""
    sport, cport = ports()
    both = f"{sport},{cport}"
    with LinkPair() as link, Processes(link) as procs:
        pin_client_port(link, cport)
        receiver_ns = os.stat(f"/run/netns/{link.receiver}").st_ino
        server = procs.held(link.receiver, "server", RECEIVER_ADDR, sport, "--recv", 1000)
        before = nstat(link, link.receiver, "TcpExtTCPSynRetrans")
        with Tracer("retrans", "-o", "json", "-L", both) as events, \
                Tracer("retrans", "-o", "json", "-p", str(server.pid)) as by_pid, \
                Tracer("retrans", "-c", "--top", "1", "-o", "json", "-L", both) as top, \
                Tracer("retrans", "-L", str(sport)) as table:
            procs.go(server)
            link.drop_input(link.receiver, f"ip saddr {SENDER_ADDR} tcp dport {sport} tcp flags & syn == 0")
            client = procs.peer(link.sender, "client", RECEIVER_ADDR, sport, "--send", 1000, "--close-first")
            wait_for(lambda: nstat(link, link.receiver, "TcpExtTCPSynRetrans") > before, "a SYN-ACK retransmit")
            link.clear_rules(link.receiver)
            procs.finish(client)
            procs.finish(server)
            settle(link)
            for t in (events, by_pid, top, table):
                assert t.stop() == 0, t.stderr
        synacks_sent = nstat(link, link.receiver, "TcpExtTCPSynRetrans") - before

    rows = events.json_rows()
    synacks = [r for r in rows if r["type"] == "synack"]
    assert len(synacks) == synacks_sent >= 1
    for r in synacks:
        assert r["comm"].startswith("python")
        assert {k: v for k, v in r.items() if k not in ("time", "comm")} == {
            "pid": server.pid, "family": 4, "laddr": RECEIVER_ADDR, "lport": sport, "raddr": SENDER_ADDR,
            "rport": cport, "state": "SYN_RECV", "type": "synack", "err": None,
            **own_workload(receiver_ns)}
    # Everything else is the client's data, sent again while its ACKs were dropped.
    assert all((r["type"], r["lport"], r["pid"]) == ("retrans", cport, client.pid) for r in rows if r not in synacks)

    assert without_time(by_pid.json_rows()) == without_time([r for r in rows if r["pid"] == server.pid])

    busiest = collections.Counter(count_key(r) for r in rows).most_common()
    [only] = top.json_rows()
    assert only["count"] == busiest[0][1] and count_key(only) in {k for k, n in busiest if n == busiest[0][1]}

    lines = table.stdout.splitlines()
    assert lines[0] == "TIME     PID     IP LADDR:LPORT           T> RADDR:RPORT           STATE"
    local, remote = f"{RECEIVER_ADDR}:{sport}", f"{SENDER_ADDR}:{cport}"
    assert [l[9:] for l in lines[1:]] == [f"{server.pid:<7} 4  {local:<21} S> {remote:<21} SYN_RECV"] * len(synacks)


def in_namespace(monkeypatch, ns):
    """Tracers started from here on run inside `ns`, where /proc/net lists
    that namespace's sockets (BPF itself sees every namespace)."""
    command = helpers.tcptrace_cmd
    monkeypatch.setattr(helpers, "tcptrace_cmd", lambda *args: ["ip", "netns", "exec", ns, *command(*args)])


def test_listener_opened_before_tracing(bpf, monkeypatch):
    """The kernel never saw this listen(): its owner comes from /proc at
    start, so its SYN-ACKs have an owner in the kernel, and -p matches them."""
    sport, cport = ports()
    with LinkPair() as link, Processes(link) as procs:
        pin_client_port(link, cport)
        server = procs.peer(link.receiver, "server", RECEIVER_ADDR, sport, "--recv", 1000)
        before = nstat(link, link.receiver, "TcpExtTCPSynRetrans")
        in_namespace(monkeypatch, link.receiver)
        with Tracer("retrans", "-o", "json", "-p", str(server.pid)) as by_pid:
            link.drop_input(link.receiver, f"ip saddr {SENDER_ADDR} tcp dport {sport} tcp flags & syn == 0")
            client = procs.peer(link.sender, "client", RECEIVER_ADDR, sport, "--send", 1000, "--close-first")
            wait_for(lambda: nstat(link, link.receiver, "TcpExtTCPSynRetrans") > before, "a SYN-ACK retransmit")
            link.clear_rules(link.receiver)
            procs.finish(client)
            procs.finish(server)
            settle(link)
            assert by_pid.stop() == 0, by_pid.stderr
        synacks_sent = nstat(link, link.receiver, "TcpExtTCPSynRetrans") - before

    rows = by_pid.json_rows()
    assert len(rows) == synacks_sent >= 1
    assert {(r["type"], r["pid"], r["lport"], r["rport"]) for r in rows} == {("synack", server.pid, sport, cport)}


def test_connection_opened_before_tracing(bpf, monkeypatch):
    """The kernel never saw this connect(): the owner shown comes from /proc;
    -p, which runs in the kernel, cannot match it (as --help says)."""
    sport, cport = ports()
    with LinkPair() as link, Processes(link) as procs:
        pin_client_port(link, cport)
        sender_ns = os.stat(f"/run/netns/{link.sender}").st_ino
        # The handshake passes, the data never does: the client keeps sending it again.
        link.drop_input(link.receiver, f"ip saddr {SENDER_ADDR} tcp dport {sport} ip length > 200")
        procs.peer(link.receiver, "server", RECEIVER_ADDR, sport, "--recv", 100_000)
        client = procs.peer(link.sender, "client", RECEIVER_ADDR, sport, "--send", 100_000)
        wait_for(lambda: link.retrans_segs(link.sender) > 0, "the client to retransmit")
        in_namespace(monkeypatch, link.sender)
        with Tracer("retrans", "-o", "json", "-L", str(cport)) as events, \
                Tracer("retrans", "-o", "json", "-p", str(client.pid)) as by_pid:
            mark = link.retrans_segs(link.sender)
            wait_for(lambda: link.retrans_segs(link.sender) > mark, "a retransmit while tracing", timeout=60)
            for t in (events, by_pid):
                assert t.stop() == 0, t.stderr

    rows = events.json_rows()
    assert rows
    for r in rows:
        assert r["comm"].startswith("python")
        assert {k: v for k, v in r.items() if k not in ("time", "comm")} == {
            "pid": client.pid, "family": 4, "laddr": SENDER_ADDR, "lport": cport, "raddr": RECEIVER_ADDR,
            "rport": sport, "state": "ESTABLISHED", "type": "retrans", "err": 0,
            # `ip netns exec` gave the tracer a /sys without the cgroup2
            # mount: the id is the socket's, its path cannot be looked up.
            **own_workload(sender_ns), "cgroup": None}
    assert by_pid.json_rows() == []


OLD_VIEW = """
import sys
from tcptrace import cli, tracefs
from tcptrace.runtime import session
saved = sys.argv[1]
session.formats_source = lambda formats_dir=None: tracefs.FormatSource(saved)
sys.argv = ["tcptrace", *sys.argv[2:]]
cli.main()
"""


def as_an_older_kernel(monkeypatch, tmp_path):
    """Tracers started from here on read this kernel's formats without the
    fields older kernels lack (5.10 has no `family`, 4.19 no `state`, 6.8 no
    `err`): the other fields keep their offsets, so the adapted program reads
    this kernel's real records."""
    live = runtime.formats_source()
    for tp in ("tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack", "sock:inet_sock_set_state"):
        category, name = tp.split(":")
        with open(os.path.join(live.root, "events", category, name, "format")) as f:
            lines = f.read().splitlines()
        if category == "tcp":
            lines = [l for l in lines if not re.match(r"\s*field:.*\b(family|state|err);", l)]
        (tmp_path / category).mkdir(exist_ok=True)
        (tmp_path / category / f"{name}.format").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(helpers, "tcptrace_cmd", lambda *args: [sys.executable, "-c", OLD_VIEW, str(tmp_path), *args])


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_records_without_family_state_or_err(bpf, ip, monkeypatch, tmp_path):
    """The paths older kernels take, run on real events: the family comes
    from the IPv6 copies of the addresses, the state and err are unknown;
    everything else is what the full record gives."""
    sender_addr, receiver_addr, proto, version = HOSTS[ip]
    sport, cport = ports()
    with LinkPair() as link, Processes(link) as procs:
        if ip == "v6":
            add_ipv6(link)
        pin_client_port(link, cport)
        link.lose_tcp(link.receiver, f"{proto} saddr {sender_addr}")
        with Tracer("retrans", "-o", "json", "-L", f"{sport},{cport}") as full:
            as_an_older_kernel(monkeypatch, tmp_path)
            with Tracer("retrans", "-o", "json", "-L", f"{sport},{cport}") as old, \
                    Tracer("retrans", "-c", "-o", "json", "-L", f"{sport},{cport}", f"-{version}") as old_counts:
                server = procs.peer(link.receiver, "server", receiver_addr, sport, "--recv", SIZE // 3)
                client = procs.peer(link.sender, "client", receiver_addr, sport, "--send", SIZE // 3,
                                    "--close-first")
                procs.finish(client)
                procs.finish(server)
                settle(link)
                # Stopped together: a late retransmit (of a FIN, say) must not
                # reach one tracer and miss the next.
                time.sleep(0.3)
                for t in (full, old, old_counts):
                    t.proc.send_signal(signal.SIGINT)
                for t in (full, old, old_counts):
                    assert t.wait(timeout=30) == 0, t.stderr

    rows = without_time(full.json_rows())
    old_rows = without_time(old.json_rows())
    assert rows and {r["family"] for r in rows} == {version}
    assert {r["family"] for r in old_rows} == {version}
    # Every row of the full record, as the old path sees it. The old path may
    # see more: without `err` it cannot leave out attempts that failed to
    # send (which this kernel reports and the full path drops).
    as_old = collections.Counter(tuple(sorted(dict(r, state=None, err=None).items())) for r in rows)
    seen_old = collections.Counter(tuple(sorted(r.items())) for r in old_rows)
    assert not as_old - seen_old, as_old - seen_old
    assert {count_key(c): c["count"] for c in old_counts.json_rows()} == collections.Counter(
        count_key(r) for r in old_rows)
