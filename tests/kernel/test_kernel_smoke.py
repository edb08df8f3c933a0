"""The privileged smoke suite for a second real kernel (`make test-kernel`).

scripts/test-kernel.sh boots Debian's 6.1 and 6.12 kernels under qemu and
runs this file inside each; it passes on the host's kernel too
(TCPTRACE_KERNEL_SMOKE=1).
It checks what differs between kernels: state changes over IPv4 and IPv6,
byte counts from this kernel's BTF offsets, resets in both tcp_send_reset
layouts, every other tool's program against this kernel's verifier,
doctor's verdict, and the saved format files of this kernel.

Under software emulation everything is 50-100 times slower (a build takes
half a minute), so every tracer starts at once and their builds overlap,
the traffic for all checks is made once, and each test judges its share.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

import helpers
from helpers import ROOT, Peer, Tracer, free_port, session, tcptrace_cmd
from tcptrace import headers, runtime, tracefs
from tcptrace.programs import PROGRAMS
from tcptrace.tools import TOOLS, drops
from test_states_live import CLIENT_FIRST, by_socket

HOSTS = {"v4": ("127.0.0.1", socket.AF_INET, 4), "v6": ("::1", socket.AF_INET6, 6)}
WILDCARD = {4: "0.0.0.0", 6: "::"}
RELEASE = os.uname().release
KERNEL = headers.version_triple(RELEASE)
# Since 6.10 tcp_send_reset has sockaddrs instead of ports, says why the
# reset was sent, and also fires for one that answers a segment no socket
# wanted (a SYN to a closed port).
NEW_SEND_RESET = KERNEL >= (6, 10, 0)
FORMATS = os.path.join(ROOT, "tests", "data", "formats")
RESULTS = os.environ.get("TCPTRACE_KERNEL_RESULTS")  # a directory the host reads back
LIFE_SIZES = {"v4": (100_000, 5_000), "v6": (5_000, 100_000)}
# A build under emulation takes ~30 s alone and several share two CPUs here.
READY_TIMEOUT = 400
STOP_TIMEOUT = 180


class SlowTracer(Tracer):
    """A Tracer with the patience emulation needs to stop."""

    def stop(self, sig=signal.SIGINT, settle=1.0):
        if self.returncode is not None:
            return self.returncode
        time.sleep(settle)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self._collect(STOP_TIMEOUT)


def save(name, text):
    if RESULTS:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, name), "w") as f:
            f.write(text)


def start_all(tracers):
    """Start every tracer at once; {tool: error text} for those that did not attach."""
    failed = {}

    def start(tool, tracer):
        try:
            tracer.__enter__()
        except BaseException as e:  # judged by the tool's test, not here
            failed[tool] = str(e)

    threads = [threading.Thread(target=start, args=item) for item in tracers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


def aborted(host, family, server_port, client_port):
    """A session this process opens on both ends; the client aborts it
    (SO_LINGER 0): a reset sent from a full socket, on every kernel."""
    with socket.socket(family) as listener:
        listener.bind((host, server_port))
        listener.listen()
        client = socket.socket(family)
        client.bind((host, client_port))
        client.connect((host, server_port))
        conn, _ = listener.accept()
        with conn:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            conn.settimeout(30)
            with pytest.raises(ConnectionResetError):
                while conn.recv(1):
                    pass


def refused(host, family, local_port, closed_port):
    with socket.socket(family) as s:
        s.bind((host, local_port))
        with pytest.raises(ConnectionRefusedError):
            s.connect((host, closed_port))


class Smoke:
    """The ports of every check, its tracer, and what traffic was made."""

    def __init__(self):
        taken = set()

        def port(family=socket.AF_INET, host="127.0.0.1"):
            # Distinct across families too: each tracer's -L list mixes them.
            while True:
                p = free_port(family, host)
                if p not in taken:
                    taken.add(p)
                    return p

        self.ports = {}
        for ip, (host, family, _) in HOSTS.items():
            self.ports[ip] = {name: port(family, host) for name in (
                "states_server", "states_client", "life_server", "life_client",
                "abort_server", "abort_client")}
        self.ports["v4"]["refused_local"] = port()
        self.ports["v4"]["refused_closed"] = port()
        self.ports["idle"] = port()
        self.tracers = {}
        self.failed = {}
        self.peers = {}
        self.times = {}

    def port_list(self, *names):
        return ",".join(str(self.ports[ip][n]) for ip in HOSTS for n in names if n in self.ports[ip])

    def plan(self):
        t = {}
        t["states"] = SlowTracer("states", "-o", "json", "-L", self.port_list("states_server", "states_client"))
        t["states -D"] = SlowTracer("states", "-o", "json", "-D", self.port_list("states_client"))
        t["life"] = SlowTracer("life", "-o", "json", "-L", self.port_list("life_server", "life_client"))
        t["resets"] = SlowTracer("resets", "-o", "json", "-L",
                                 self.port_list("refused_local", "refused_closed", "abort_server", "abort_client"))
        t["connect"] = SlowTracer("connect", "-o", "json", "-L", self.port_list("refused_local", "abort_client"))
        t["accept"] = SlowTracer("accept", "-o", "json", "-L", self.port_list("abort_server"))
        # Attached for the verifier and the tracepoints: loopback does not retransmit.
        t["retrans"] = SlowTracer("retrans", "-o", "json", "-L", str(self.ports["idle"]))
        # The refused connect's SYN reaches no socket: the kernel drops it as NO_SOCKET.
        t["drops"] = SlowTracer("drops", "-o", "json", "--reason", "NO_SOCKET")
        # tcp_probe on `life`'s transfers: rows, exact bytes acked, histograms (6.1 lacks skaddr).
        life = self.port_list("life_server", "life_client")
        t["probe"] = SlowTracer("probe", "-o", "json", "-L", life)
        t["probe -c"] = SlowTracer("probe", "-c", "-o", "json", "-L", life)
        t["probe --hist"] = SlowTracer("probe", "--hist", "rtt", "--by", "lport", "-o", "json", "-L", life)
        # The same transfers' application bytes (6.3+), or bytes acknowledged before.
        t["top"] = SlowTracer("top", "-o", "json", "-C", "-L", life)
        return t

    def traffic(self):
        for ip, (host, family, _) in HOSTS.items():
            p = self.ports[ip]
            self.peers[("states", ip)] = session(host, p["states_server"], p["states_client"],
                                                 client_send=1000, server_send=2000)
            cs, ss = LIFE_SIZES[ip]
            server = Peer("server", host, p["life_server"], "--send", ss, "--recv", cs)
            client = Peer("client", host, p["life_server"], "--bind-port", p["life_client"], "--send", cs,
                          "--recv", ss, "--close-first", "--half-close")
            client.wait(60)
            server.wait(60)
            self.peers[("life", ip)] = (server, client)
            aborted(host, family, p["abort_server"], p["abort_client"])
        refused("127.0.0.1", socket.AF_INET, self.ports["v4"]["refused_local"], self.ports["v4"]["refused_closed"])

    def run(self):
        helpers.READY_TIMEOUT = READY_TIMEOUT
        self.tracers = self.plan()
        started = time.monotonic()
        self.failed = start_all(self.tracers)
        self.times["attach_s"] = round(time.monotonic() - started, 1)
        try:
            if len(self.failed) < len(self.tracers):
                started = time.monotonic()
                self.traffic()
                self.times["traffic_s"] = round(time.monotonic() - started, 1)
        finally:
            for tool, tracer in self.tracers.items():
                if tool not in self.failed:
                    tracer.stop()
                    tracer.__exit__(None, None, None)
                save(f"{tool.replace(' ', '')}.stdout", tracer.stdout)
                save(f"{tool.replace(' ', '')}.stderr", tracer.stderr)
        save("smoke.json", json.dumps({"release": RELEASE, "times": self.times, "failed": self.failed,
                                       "ports": self.ports}, indent=2))
        return self

    def rows(self, tool):
        if tool in self.failed:
            pytest.fail(f"tcptrace {tool} did not start on {RELEASE}: {self.failed[tool]}")
        tracer = self.tracers[tool]
        assert tracer.returncode == 0, f"tcptrace {tool} ended with {tracer.returncode}: {tracer.stderr}"
        # Built from the generated header set, not the kernel's headers
        # (which may be installed here and would hide a header-free failure).
        assert "header-free build" in tracer.stderr, tracer.stderr
        return tracer.json_rows()


@pytest.fixture(scope="module")
def smoke(bpf):
    return Smoke().run()


def test_every_tool_runs_on_this_kernel():
    """The second kernel's verifier sees every tool's program: a new tool
    gets a tracer here, and its checks below."""
    assert {name.split()[0] for name in Smoke().plan()} >= set(TOOLS)


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_states_exact_transitions(smoke, ip):
    host, _family, version = HOSTS[ip]
    sport, cport = smoke.ports[ip]["states_server"], smoke.ports[ip]["states_client"]
    rows = [r for r in smoke.rows("states") if r["family"] == version]
    assert by_socket(rows, sport, cport) == CLIENT_FIRST
    server, client = smoke.peers[("states", ip)]
    socks = {}
    for r in rows:
        socks.setdefault(r["skaddr"], []).append(r)
    for seq in socks.values():
        # One socket's changes arrive in the order they happened.
        assert [r["oldstate"] for r in seq[1:]] == [r["newstate"] for r in seq[:-1]]
        assert all(r["laddr"] == host for r in seq)
    client_rows = [r for r in rows if r["lport"] == cport]
    assert client_rows[0]["pid"] == client.pid
    for r in client_rows[1:]:
        assert (r["raddr"], r["rport"]) == (host, sport)
    child = next(seq for seq in socks.values() if seq[0]["oldstate"] == "LISTEN" and seq[0]["newstate"] == "SYN_RECV")
    for r in child[1:]:
        assert (r["lport"], r["raddr"], r["rport"]) == (sport, host, cport)
    # The child's first change: 6.1 and 6.12 report it before the peer's
    # address and port are copied into the new socket, 6.18 after.
    first = child[0]
    assert (first["raddr"], first["rport"]) in ((host, cport), (WILDCARD[version], 0)), first
    if KERNEL[:2] in ((6, 1), (6, 12)):
        assert (first["raddr"], first["rport"]) == (WILDCARD[version], 0), first


def portless_child(smoke, version):
    """Whether this kernel reports a listener's child before its peer (6.1)."""
    first = next(r for r in smoke.rows("states")
                 if r["family"] == version and (r["oldstate"], r["newstate"]) == ("LISTEN", "SYN_RECV"))
    return first["rport"] == 0


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_states_remote_port_filter(smoke, ip):
    """-D <the client's port> keeps the accepted child's changes, each with
    its time in the old state, also where its first change has no peer yet."""
    host, _family, version = HOSTS[ip]
    sport, cport = smoke.ports[ip]["states_server"], smoke.ports[ip]["states_client"]
    portless = portless_child(smoke, version)
    rows = [r for r in smoke.rows("states -D") if r["family"] == version]
    assert {(r["lport"], r["rport"]) for r in rows} == {(sport, cport)}, rows
    expected = CLIENT_FIRST["server"][1:] if portless else CLIENT_FIRST["server"]
    assert [f"{r['oldstate']}>{r['newstate']}" for r in rows] == expected
    assert all(r["ms"] is not None for r in rows), rows


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_life_byte_counts(smoke, ip):
    """bytes_acked counts the SYN (connecting side) and our FIN,
    bytes_received the peer's FIN, as tests/test_life_live.py says."""
    host, _family, version = HOSTS[ip]
    sport, cport = smoke.ports[ip]["life_server"], smoke.ports[ip]["life_client"]
    cs, ss = LIFE_SIZES[ip]
    server, client = smoke.peers[("life", ip)]
    rows = [r for r in smoke.rows("life") if r["family"] == version]
    assert len(rows) == 2, rows
    c = next(r for r in rows if r["lport"] == cport)
    s = next(r for r in rows if r["lport"] == sport)
    assert (c["pid"], c["laddr"], c["raddr"], c["rport"]) == (client.pid, host, host, sport)
    assert (s["pid"], s["laddr"], s["raddr"], s["rport"]) == (server.pid, host, host, cport)
    assert (c["tx_bytes"], c["rx_bytes"]) == (cs + 2, ss + 1)
    assert (s["tx_bytes"], s["rx_bytes"]) == (ss + 1, cs + 1)
    for r in (c, s):
        assert r["partial"] is False and r["ms"] > 0


def _resets(smoke):
    me = os.getpid()
    rows = smoke.rows("resets")
    for r in rows:
        if r["pid"] is not None:
            assert r["pid"] == me, r
    return rows


def test_resets_refused_connect(smoke):
    local, closed = smoke.ports["v4"]["refused_local"], smoke.ports["v4"]["refused_closed"]
    rows = [r for r in _resets(smoke) if {r["lport"], r["rport"]} == {local, closed}]
    recv = [r for r in rows if r["dir"] == "RECV"]
    sent = [r for r in rows if r["dir"] == "SENT"]
    assert len(recv) == 1, rows
    r = recv[0]
    assert (r["lport"], r["rport"], r["laddr"], r["raddr"], r["family"]) == (local, closed, "127.0.0.1",
                                                                              "127.0.0.1", 4)
    assert (r["pid"], r["state"], r["reason"]) == (os.getpid(), "SYN_SENT", None)
    if NEW_SEND_RESET:
        # The closed port answers without a socket: no owner, no state.
        assert len(sent) == 1, rows
        s = sent[0]
        assert (s["lport"], s["rport"], s["pid"], s["state"]) == (closed, local, None, None)
        # Named from this kernel's own sk_rst_reason table (its numbers move).
        assert s["reason"] == "NO_SOCKET", s
    else:
        # Before 6.10 tcp_send_reset fires only for a full socket.
        assert sent == [], rows


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_resets_abort(smoke, ip):
    """An abort sends the reset from a full socket: tcp_send_reset's ports
    and family come from sport/dport/family before 6.10, from sockaddrs after."""
    host, _family, version = HOSTS[ip]
    server, client = smoke.ports[ip]["abort_server"], smoke.ports[ip]["abort_client"]
    rows = [r for r in _resets(smoke) if {r["lport"], r["rport"]} == {server, client}]
    assert sorted(r["dir"] for r in rows) == ["RECV", "SENT"], rows
    sent = next(r for r in rows if r["dir"] == "SENT")
    recv = next(r for r in rows if r["dir"] == "RECV")
    for r, (lport, rport) in ((sent, (client, server)), (recv, (server, client))):
        assert (r["family"], r["laddr"], r["lport"], r["raddr"], r["rport"]) == (version, host, lport, host, rport)
        assert (r["pid"], r["state"]) == (os.getpid(), "ESTABLISHED")
    assert recv["reason"] is None
    assert (sent["reason"] is not None) == NEW_SEND_RESET


def test_connect_ok_and_refused(smoke):
    rows = smoke.rows("connect")
    me = os.getpid()
    refused_row = [r for r in rows if r["lport"] == smoke.ports["v4"]["refused_local"]]
    assert len(refused_row) == 1, rows
    assert (refused_row[0]["pid"], refused_row[0]["rport"], refused_row[0]["result"]) == (
        me, smoke.ports["v4"]["refused_closed"], "REFUSED")
    for ip, (host, _family, version) in HOSTS.items():
        ok = [r for r in rows if r["lport"] == smoke.ports[ip]["abort_client"]]
        assert len(ok) == 1, rows
        assert (ok[0]["pid"], ok[0]["family"], ok[0]["raddr"], ok[0]["rport"], ok[0]["result"]) == (
            me, version, host, smoke.ports[ip]["abort_server"], "OK")
        assert ok[0]["lat_ms"] >= 0


def test_accept_peer(smoke):
    rows = smoke.rows("accept")
    for ip, (host, _family, version) in HOSTS.items():
        mine = [r for r in rows if r["lport"] == smoke.ports[ip]["abort_server"]]
        assert len(mine) == 1, rows
        r = mine[0]
        assert (r["pid"], r["family"], r["laddr"], r["raddr"], r["rport"]) == (
            os.getpid(), version, host, host, smoke.ports[ip]["abort_client"])


def test_retrans_attaches(smoke):
    assert smoke.rows("retrans") == []


def test_drops_no_socket(smoke):
    """The SYN of the refused connect, dropped with the kernel's own reason
    name for it, with the 4-tuple as it was on the wire."""
    local, closed = smoke.ports["v4"]["refused_local"], smoke.ports["v4"]["refused_closed"]
    rows = [r for r in smoke.rows("drops") if (r["sport"], r["dport"]) == (local, closed)]
    assert len(rows) == 1, smoke.rows("drops")
    r = rows[0]
    assert (r["reason"], r["flags"], r["saddr"], r["daddr"], r["family"]) == (
        "NO_SOCKET", "S", "127.0.0.1", "127.0.0.1", 4)
    # The owners' state changes taken raw: every kernel booted here has the
    # prototype and offsets in its BTF, and its verifier took the program.
    assert runtime.plan(drops.SPEC, runtime.RunOptions(), runtime.formats_source()).raw == (
        "sock:inet_sock_set_state",)
    assert "sock:inet_sock_set_state taken raw" in smoke.tracers["drops"].stderr


def test_doctor(bpf):
    """doctor on the running kernel: every subcommand can run (some columns
    may be blank on an older kernel), and the verdict from this kernel's
    saved formats is the same."""
    proc = subprocess.run(tcptrace_cmd("doctor", "-o", "json"), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    save("doctor.json", proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    live = json.loads(proc.stdout)
    assert live["release"] == RELEASE
    assert {c["name"] for c in live["commands"]} == set(PROGRAMS)
    assert all(c["status"] in ("ok", "partial") for c in live["commands"]), live["commands"]
    saved = saved_formats_dir()
    if saved is None:
        pytest.skip(f"no saved formats for {RELEASE} in tests/data/formats")
    proc = subprocess.run(tcptrace_cmd("doctor", "--formats", saved, "-o", "json"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    from_saved = json.loads(proc.stdout)
    assert [(c["name"], c["status"]) for c in from_saved["commands"]] == [
        (c["name"], c["status"]) for c in live["commands"]]
    assert {t["name"]: t["fields"] for t in from_saved["tracepoints"]} == {
        t["name"]: t["fields"] for t in live["tracepoints"]}


def saved_formats_dir():
    """The saved format set of this kernel: its release exactly, or else the
    one of the same major.minor read from a running kernel."""
    candidates = []
    for name in sorted(os.listdir(FORMATS)):
        path = os.path.join(FORMATS, name, "KERNEL_RELEASE")
        if os.path.exists(path):
            with open(path) as f:
                candidates.append((f.read().strip(), os.path.join(FORMATS, name)))
    for release, path in candidates:
        if release == RELEASE:
            return path
    for release, path in candidates:
        if headers.version_triple(release)[:2] == KERNEL[:2]:
            return path
    return None


def test_saved_formats_match_this_kernel(bpf):
    """tests/data/formats/<this kernel>: what every unit test on formats
    trusts. Same fields at the same offsets; for the very release, the same
    file but for the event ID, which a kernel assigns at boot."""
    saved = saved_formats_dir()
    if saved is None:
        pytest.skip(f"no saved formats for {RELEASE} in tests/data/formats")
    with open(os.path.join(saved, "KERNEL_RELEASE")) as f:
        exact = f.read().strip() == RELEASE
    root = tracefs.ensure_mounted()
    assert root, "tracefs is not mounted"
    compared = 0
    for category in sorted(os.listdir(saved)):
        cat_dir = os.path.join(saved, category)
        if not os.path.isdir(cat_dir):
            continue
        for fname in sorted(os.listdir(cat_dir)):
            name = fname[: -len(".format")]
            with open(os.path.join(cat_dir, fname)) as f:
                want = f.read()
            with open(os.path.join(root, "events", category, name, "format")) as f:
                got = f.read()
            if exact:
                strip = lambda text: [line for line in text.splitlines() if not line.startswith("ID:")]  # noqa: E731
                assert strip(got) == strip(want), f"{category}:{name}"
            fields = lambda text: [(x.name, x.ctype, x.offset, x.size, x.signed)  # noqa: E731
                                   for x in tracefs.parse_format(text, category, name).fields]
            assert fields(got) == fields(want), f"{category}:{name}"
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_probe_sockets_bytes_and_histograms(smoke, ip):
    """tcp_probe on `life`'s transfers: each side's rows with its owner and
    a congestion state (5.19+), bytes acked of each side = what it sent and
    its FIN, and one histogram per local port holding every probe that -c
    counted for that socket."""
    host, _family, version = HOSTS[ip]
    sport, cport = smoke.ports[ip]["life_server"], smoke.ports[ip]["life_client"]
    cs, ss = LIFE_SIZES[ip]
    server, client = smoke.peers[("life", ip)]
    rows = [r for r in smoke.rows("probe") if r["family"] == version]
    for port, peer, pid in ((cport, sport, client.pid), (sport, cport, server.pid)):
        mine = [r for r in rows if (r["lport"], r["rport"]) == (port, peer)]
        assert mine, rows
        for r in mine:
            assert (r["pid"], r["laddr"], r["raddr"]) == (pid, host, host), r
            assert r["cwnd"] > 0 and r["srtt_us"] > 0, r
            if KERNEL >= (5, 19, 0):
                assert r["ca_state"] == "Open", r
    counts = {r["lport"]: r for r in smoke.rows("probe -c") if r["family"] == version}
    assert counts[cport]["bytes_acked"] == cs + 1 and counts[sport]["bytes_acked"] == ss + 1, counts
    hists = {h["lport"]: h for h in smoke.rows("probe --hist")}
    for port in (cport, sport):
        assert hists[port]["hist"] == "srtt_us"
        assert hists[port]["count"] == sum(b[2] for b in hists[port]["buckets"]) == counts[port]["count"]


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_top_bytes_of_each_side(smoke, ip):
    """top on `life`'s transfers, summed over its intervals: from 6.3 the
    bytes each side's application sent and received, exactly; before, the
    documented fallback: bytes acknowledged (at most what was sent and the
    FIN), receive blank."""
    cs, ss = LIFE_SIZES[ip]
    sport, cport = smoke.ports[ip]["life_server"], smoke.ports[ip]["life_client"]
    _host, _family, version = HOSTS[ip]
    totals = {}
    for r in smoke.rows("top"):
        if r.get("family", version) == version and (r["lport"], r["rport"]) in ((cport, sport), (sport, cport)):
            t = totals.setdefault(r["lport"], {"tx": 0, "rx": 0, "acked": r["tx_acked"]})
            t["tx"] += r["tx_bytes"]
            t["rx"] = None if r["rx_bytes"] is None else (t["rx"] or 0) + r["rx_bytes"]
    assert set(totals) == {cport, sport}, smoke.rows("top")
    if KERNEL >= (6, 3, 0):
        assert (totals[cport]["tx"], totals[cport]["rx"]) == (cs, ss), totals
        assert (totals[sport]["tx"], totals[sport]["rx"]) == (ss, cs), totals
    else:
        for port, sent in ((cport, cs), (sport, ss)):
            assert totals[port]["acked"] and totals[port]["rx"] is None, totals
            assert 0 < totals[port]["tx"] <= sent + 1, totals


def test_workload_cgroup_of_a_client(bpf, monkeypatch):
    """A client in a test cgroup under this kernel's cgroup2 mount: life
    filtered on that cgroup in the kernel shows its session, with the
    cgroup's id (its directory's inode), path and this netns; the server,
    in tcptrace's cgroup, is left out."""
    import sys

    from tcptrace import workload

    monkeypatch.setattr(helpers, "READY_TIMEOUT", READY_TIMEOUT)
    found = workload.cgroup2_mount()
    assert found, "no cgroup2 mount in /proc/self/mountinfo"
    mount = os.path.realpath(found[0])
    cgroup = os.path.join(mount, f"tcptrace-smoke-{os.getpid()}")
    os.mkdir(cgroup)
    port = free_port()
    script = ("import os, socket, sys\n"
              f"open({os.path.join(cgroup, 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
              f"c = socket.create_connection(('127.0.0.1', {port}))\n"
              "c.sendall(b'x' * 1000)\nc.close()\n")
    server = socket.socket()
    try:
        server.bind(("127.0.0.1", port))
        server.listen(4)
        with SlowTracer("life", "-o", "json", "--cgroup", cgroup) as tracer:
            subprocess.run([sys.executable, "-c", script], check=True, timeout=STOP_TIMEOUT)
            conn, _ = server.accept()
            while conn.recv(65536):
                pass
            conn.close()
            tracer.stop()
        rows = [r for r in tracer.json_rows() if port in (r["lport"], r["rport"])]
        assert len(rows) == 1 and rows[0]["rport"] == port, rows
        assert rows[0]["cgroup_id"] == os.stat(cgroup).st_ino
        assert rows[0]["cgroup"] == cgroup[len(mount):]
        assert rows[0]["netns"] == os.stat("/proc/self/ns/net").st_ino
    finally:
        server.close()
        for _ in range(50):
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.1)
