"""tcptrace drops against real drops of known reasons (root + BPF): a SYN to
a closed port, an nftables drop, a bad checksum, a segment outside the
receive window, a SYN without the listener's TCP-MD5 signature, a full
accept queue, and the purge of a closed connection that is not a drop."""

import io
import re
import socket
import subprocess
import sys
import time

import pytest
from endpoint import Endpoint
from helpers import Tracer, free_port, tcptrace_cmd
from test_workload_live import NO_WORKLOAD, own_workload  # noqa: F401
from netns import RECEIVER_ADDR, SENDER_ADDR, LinkPair

from tcptrace import runtime, tracefs
from tcptrace.tools import drops

HOSTS = {"v4": ("127.0.0.1", socket.AF_INET, 4), "v6": ("::1", socket.AF_INET6, 6)}


def reason_table():
    fmt = tracefs.FormatSource(tracefs.ensure_mounted()).load("skb:kfree_skb")
    return drops.reason_table({drops.REASON_SYMBOLS: fmt.symbols.get("reason", {})})


def segment(family, saddr, sport, daddr, dport, flags, reason, pid=None, comm=None, state=None, work=NO_WORKLOAD):
    """A drop row; `work` its workload keys (none: the segment found no socket)."""
    return {"pid": pid, "comm": comm, "family": family, "saddr": saddr, "sport": sport, "daddr": daddr,
            "dport": dport, "state": state, "flags": flags, "reason": reason, **work}


def refused(host, port, times=1, bind_port=0):
    extra = ("--bind-port", bind_port) if bind_port else ()
    for _ in range(times):
        assert Endpoint("client", host, port, *extra).outcome() == "refused"


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_syn_to_closed_port_is_no_socket(bpf, ip):
    """The SYN finds no socket: one NO_SOCKET drop, the segment's own
    4-tuple, no owner and no state."""
    host, family, version = HOSTS[ip]
    closed, cport = free_port(family, host), free_port(family, host)
    with Tracer("drops", "-o", "json", "-L", str(closed)) as t:
        refused(host, closed, bind_port=cport)
        assert t.stop() == 0, t.stderr
    assert t.json_rows() == [segment(version, host, cport, host, closed, "S", "NO_SOCKET")]


def test_table_output(bpf):
    closed, cport = free_port(), free_port()
    with Tracer("drops", "-L", str(closed)) as t:
        refused("127.0.0.1", closed, bind_port=cport)
        assert t.stop() == 0, t.stderr
    lines = t.stdout.splitlines()
    assert lines[0].split() == ["PID", "SADDR:SPORT", "DADDR:DPORT", "STATE", "FLAGS", "REASON"]
    assert lines[1].split() == ["-", f"127.0.0.1:{cport}", f"127.0.0.1:{closed}", "-", "S", "NO_SOCKET"]
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines)


def test_count_totals_equal_the_rows_of_the_same_run(bpf):
    """Two tracers see the same five refused SYNs: -c counts them in the
    kernel, the other prints them; the numbers must agree."""
    closed = free_port()
    with Tracer("drops", "-c", "-o", "json", "-L", str(closed)) as counting, \
            Tracer("drops", "-o", "json", "-L", str(closed)) as tracing:
        refused("127.0.0.1", closed, times=5)
        assert tracing.stop() == 0, tracing.stderr
        assert counting.stop() == 0, counting.stderr
    rows = tracing.json_rows()
    assert len(rows) == 5 and {r["reason"] for r in rows} == {"NO_SOCKET"}
    assert counting.json_rows() == [{"reason": "NO_SOCKET", "lport": None, "count": 5}]


def test_count_by_local_port(bpf):
    closed, other = free_port(), free_port()
    with Tracer("drops", "-c", "--by", "lport", "-o", "json", "-L", f"{closed},{other}") as t:
        refused("127.0.0.1", closed, times=2)
        refused("127.0.0.1", other, times=3)
        assert t.stop() == 0, t.stderr
    assert sorted(t.json_rows(), key=lambda r: r["count"]) == [
        {"reason": "NO_SOCKET", "lport": closed, "count": 2},
        {"reason": "NO_SOCKET", "lport": other, "count": 3},
    ]


def test_reason_filter_runs_in_the_kernel(bpf):
    """--reason keeps only the reasons named: a NO_SOCKET drop is not a
    TCP_CSUM one."""
    closed = free_port()
    with Tracer("drops", "-o", "json", "--reason", "TCP_CSUM", "-L", str(closed)) as csum, \
            Tracer("drops", "-o", "json", "--reason", "tcp_csum,no_socket", "-L", str(closed)) as both:
        refused("127.0.0.1", closed)
        assert csum.stop() == 0 and both.stop() == 0, csum.stderr + both.stderr
    assert csum.json_rows() == []
    assert [r["reason"] for r in both.json_rows()] == ["NO_SOCKET"]


def test_unknown_reason_is_a_usage_error(bpf):
    """A name this kernel's table lacks: exit 2 before anything is loaded,
    with the valid names listed."""
    result = subprocess.run(tcptrace_cmd("drops", "--reason", "NO_SUCH_REASON"), check=False, capture_output=True,
                            text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert "NO_SUCH_REASON" in result.stderr and "NO_SOCKET" in result.stderr and "TCP_CSUM" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("taken", ["raw", "record"])
def test_netfilter_drop_in_a_namespace(bpf, taken):
    """An nftables rule on the receiver's input drops the SYNs to a
    listening port: NETFILTER_DROP, before any socket is looked up, so the
    owner is the listener on that port, learned from its change to LISTEN:
    taken raw (the socket's own protocol and port) where this kernel's BTF
    allows, and from the tracepoint's record (TCPTRACE_NO_RAW_TRACEPOINTS)."""
    port = 8471
    env = {"TCPTRACE_NO_RAW_TRACEPOINTS": "1" if taken == "record" else ""}
    with LinkPair() as pair:
        pair.drop_input(pair.receiver, f"tcp dport {port}")
        with Tracer("drops", "-o", "json", "-L", str(port), env=env) as t:
            # Listening while traced: that is how the kernel side learns its owner.
            server = Endpoint("server", RECEIVER_ADDR, port, netns=pair.receiver)
            try:
                client = Endpoint("client", RECEIVER_ADDR, port, "--syncnt", 1, "--give-up", 2.5,
                                  netns=pair.sender)
                assert client.outcome() in ("timeout", "gave-up")
                assert t.stop() == 0, t.stderr
            finally:
                server.kill()
    rows = t.json_rows()
    assert len(rows) >= 2, rows  # the SYN and at least one retry
    sport = rows[0]["sport"]
    expected = segment(4, SENDER_ADDR, sport, RECEIVER_ADDR, port, "S", "NETFILTER_DROP", pid=server.pid,
                       comm=rows[0]["comm"])
    assert rows == [expected] * len(rows)
    assert rows[0]["comm"] == sys.executable.rsplit("/", 1)[-1][:15]
    raw = taken == "raw" and runtime.plan(drops.SPEC, runtime.RunOptions(), runtime.formats_source()).raw != ()
    assert ("sock:inet_sock_set_state taken raw" in t.stderr) == raw, t.stderr


def test_a_connecting_sockets_own_segment_dropped_on_output(bpf):
    """An nftables rule on the sender's output drops a connect()'s SYNs:
    NETFILTER_DROP of a segment the socket itself was sending, so the owner
    is the one recorded when it connected (the owners' table, not the
    listener fallback: nothing listens on that port), in SYN_SENT."""
    port = 8475
    with LinkPair() as pair:
        pair.drop_output(pair.sender, f"tcp dport {port}")
        with Tracer("drops", "-o", "json", "-D", str(port)) as t:
            client = Endpoint("client", RECEIVER_ADDR, port, "--syncnt", 1, "--give-up", 2.5, netns=pair.sender)
            assert client.outcome() in ("timeout", "gave-up")
            assert t.stop() == 0, t.stderr
        rows = t.json_rows()
        assert len(rows) >= 2, rows  # the SYN and at least one retry
        expected = segment(4, SENDER_ADDR, rows[0]["sport"], RECEIVER_ADDR, port, "S", "NETFILTER_DROP",
                           pid=client.pid, comm=sys.executable.rsplit("/", 1)[-1][:15], state="SYN_SENT",
                           work=own_workload(f"/run/netns/{pair.sender}"))
        assert rows == [expected] * len(rows)


def test_an_owner_displaced_in_a_table_of_one_bucket_is_counted(bpf):
    """With a table of one bucket (TCPTRACE_MAX_SOCKETS = OWNER_WAYS = 4, a
    build-time size) a fifth socket connected or listening while four are
    displaces one: each displacement is counted as a socket not tracked and
    said at exit. Here a listener and five clients open at once: at least
    two (the host's own connections may add theirs)."""
    from tcptrace import output
    from tcptrace.runtime import Session

    err = io.StringIO()
    opts = runtime.RunOptions(duration=1.5, extra={"TCPTRACE_MAX_SOCKETS": 4})
    session = Session(drops.SPEC, opts, output.writer("json", io.StringIO(), drops.COLUMNS), err=err)
    try:
        session.open()
        port = free_port()
        with socket.create_server(("127.0.0.1", port), backlog=8):
            clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
            for c in clients:
                c.close()
        session.run()
    finally:
        session.close()
    said = re.search(r"(\d+) sockets were not tracked", err.getvalue())
    assert said and int(said.group(1)) >= 2, err.getvalue()


BAD_SYN = r"""
import socket, struct, sys
src, dst, sport, dport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def csum(d):
    t = sum(struct.unpack("!%dH" % (len(d) // 2), d))
    while t >> 16: t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
hdr = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
good = csum(pseudo + hdr)
hdr = hdr[:16] + struct.pack("!H", good ^ 0x5A5A) + hdr[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.sendto(hdr, (dst, 0))
"""


def test_bad_checksum_across_a_veth(bpf):
    """A SYN whose TCP checksum is wrong, sent with a raw socket across a
    veth (loopback does not verify checksums): TCP_CSUM."""
    port, sport = 8472, 40123
    with LinkPair() as pair:
        server = Endpoint("server", RECEIVER_ADDR, port, netns=pair.receiver)
        try:
            with Tracer("drops", "-o", "json", "-L", str(port)) as t:
                pair.ns(pair.sender, sys.executable, "-c", BAD_SYN, SENDER_ADDR, RECEIVER_ADDR, str(sport), str(port))
                deadline = time.monotonic() + 10
                while '"TCP_CSUM"' not in t.stdout_so_far and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert t.stop() == 0, t.stderr
        finally:
            server.kill()
    rows = t.json_rows()
    assert [(r["saddr"], r["sport"], r["daddr"], r["dport"], r["flags"], r["reason"]) for r in rows] == [
        (SENDER_ADDR, sport, RECEIVER_ADDR, port, "S", "TCP_CSUM")]


FILL_QUEUE = r"""
import socket, sys, time
port, clients = int(sys.argv[1]), int(sys.argv[2])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port)); l.listen(0)
cs = []
for _ in range(clients):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    cs.append(c)
time.sleep(float(sys.argv[3]))
"""


def _listen_overflows(pair, ns):
    out = pair.ns(ns, "nstat", "-az", "TcpExtListenOverflows").stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("TcpExtListenOverflows"))


def test_full_accept_queue(bpf):
    """A listener that never accepts, with backlog 0, and four clients: the
    kernel counts listen overflows for the excess SYNs, but on the SYN path
    it frees them as consumed, not dropped (measured on 6.18): no drop row,
    and in particular no TCP_LISTEN_OVERFLOW, for a SYN."""
    port = 8473
    with LinkPair() as pair:
        ns = pair.receiver
        before = _listen_overflows(pair, ns)
        with Tracer("drops", "-o", "json", "-L", str(port)) as t:
            pair.ns(ns, sys.executable, "-c", FILL_QUEUE, str(port), "4", "2.5")
            assert t.stop() == 0, t.stderr
        overflows = _listen_overflows(pair, ns) - before
    assert overflows >= 3, overflows  # three excess SYNs, and their retries within 2.5 s
    syn_drops = [r for r in t.json_rows() if r["flags"] == "S"]
    assert syn_drops == []


# -- what is hidden by default: the purge of a dead socket's queue ---------------------

SERVER_CLOSES = r"""
import socket, sys
host, port, n, linger2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
l = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((host, port)); l.listen(8)
print("listening", flush=True)
for _ in range(n):
    c, _ = l.accept()
    if linger2:  # FIN_WAIT2 longer than TIME_WAIT: the closed socket stays a full socket
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, linger2)
    c.close()
sys.stdin.readline()
"""

def wait_for(tracer, text, times, timeout=10):
    deadline = time.monotonic() + timeout
    while tracer.stdout_so_far.count(text) < times and time.monotonic() < deadline:
        time.sleep(0.05)


# How the client's ACK of the server's FIN travels decides which socket its
# FIN finds. With it: the server's closed socket is still a full socket in
# FIN_WAIT2 (made certain here by TCP_LINGER2 above TIME_WAIT's 60 s, which
# keeps it one even if the ACK came alone), queues the FIN, dies, and purges
# its queue: QUEUE_PURGE in state CLOSE. Apart (the client's delayed ACK
# fires before it closes; made certain here by TCP_QUICKACK, which sends the
# pending ACK at once): the server's socket has become a TIME_WAIT socket,
# which answers the FIN and frees it as NOT_SPECIFIED; a TIME_WAIT socket has
# no cgroup, and its owner is the listener's.
PATHS = {"ack-with-fin": (120, False, "QUEUE_PURGE", "CLOSE"),
         "ack-apart": (0, True, "NOT_SPECIFIED", "TIME_WAIT")}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_fin_of_a_connection_the_server_closed_is_hidden(bpf, ip, path):
    """The server closes first; the client's FIN is freed by the server's
    socket, once per connection, after the kernel acted on it: no drop.
    Hidden and counted by default, shown by --all-reasons, and -c agrees
    with the rows in both modes; the count of purges hidden is said on
    stderr at exit."""
    host, family, version = HOSTS[ip]
    linger2, ack_apart, reason, state = PATHS[path]
    table = reason_table()
    port, n = free_port(family, host), 4
    # -L leaves hiding to the end of the program; without filters it comes
    # as soon as the segment is known to be one (HIDE_EARLY).
    with Tracer("drops", "-o", "json", "-L", str(port)) as default, \
            Tracer("drops", "-o", "json") as unfiltered, \
            Tracer("drops", "-o", "json", "--all-reasons", "-L", str(port)) as every, \
            Tracer("drops", "-c", "-o", "json", "-L", str(port)) as counted, \
            Tracer("drops", "-c", "-o", "json", "--all-reasons", "-L", str(port)) as counted_all:
        server = subprocess.Popen([sys.executable, "-c", SERVER_CLOSES, host, str(port), str(n), str(linger2)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            cports = []
            for _ in range(n):
                with socket.create_connection((host, port), timeout=10) as c:
                    cports.append(c.getsockname()[1])
                    assert c.recv(1) == b""  # the server's FIN
                    if ack_apart:
                        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                        time.sleep(0.05)  # the server's socket turns into a TIME_WAIT one
            if reason in table:
                wait_for(every, f'"{reason}"', n)
            for t in (default, unfiltered, every, counted, counted_all):
                assert t.stop() == 0, t.stderr
        finally:
            server.communicate("\n", timeout=10)
    comm = sys.executable.rsplit("/", 1)[-1][:15]
    assert default.json_rows() == counted.json_rows() == []
    if reason not in table:  # before 6.7 the purge is no drop at all
        assert every.json_rows() == []
        return
    work = own_workload()
    if state == "TIME_WAIT":  # no cgroup: only the netns
        work = {**NO_WORKLOAD, "netns": work["netns"]}
    freed = [segment(version, host, cport, host, port, "AF", reason, pid=server.pid, comm=comm,
                     state=state, work=work) for cport in cports]
    assert every.json_rows() == freed
    assert counted_all.json_rows() == [{"reason": reason, "lport": None, "count": n}]
    purges = f"tcptrace: {n} QUEUE_PURGE segments without payload left out"
    assert (purges in default.stderr) == (reason == "QUEUE_PURGE"), default.stderr
    # The host's other connections may add their own purges, never take ours.
    hidden = re.search(r"tcptrace: (\d+) QUEUE_PURGE segments without payload left out", unfiltered.stderr)
    assert (hidden is not None and int(hidden.group(1)) >= n) == (reason == "QUEUE_PURGE"), unfiltered.stderr
    assert [r for r in unfiltered.json_rows() if port in (r["sport"], r["dport"])] == []
    assert "QUEUE_PURGE segments" not in every.stderr + counted_all.stderr


# -- a segment outside the receive window -----------------------------------------

V6_SENDER, V6_RECEIVER = "fd00:198:18::1", "fd00:198:18::2"
NS_HOSTS = {"v4": (SENDER_ADDR, RECEIVER_ADDR, 4), "v6": (V6_SENDER, V6_RECEIVER, 6)}

OUT_OF_WINDOW = r"""
import socket, struct, sys
host, port, offset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = ":" in host
c = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
c.connect((host, port))
# The next sequence number the peer expects: repair mode reads it.
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_SEND_QUEUE, TCP_REPAIR_OFF_NO_WP = 19, 20, 21, 2, -1
c.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
c.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
seq = struct.unpack("=I", c.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
c.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
src, sport = c.getsockname()[:2]
hdr = struct.pack("!HHIIBBHHH", sport, port, (seq + offset) % 2**32, 0, 5 << 4, 0x10, 65535, 0, 0)
if v6:
    raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    raw.setsockopt(socket.IPPROTO_IPV6, 7, 16)  # IPV6_CHECKSUM: the kernel fills it in at byte 16
    raw.sendto(hdr, (host, 0))
else:
    def csum(d):
        t = sum(struct.unpack("!%dH" % (len(d) // 2), d))
        while t >> 16: t = (t & 0xFFFF) + (t >> 16)
        return ~t & 0xFFFF
    pseudo = socket.inet_aton(src) + socket.inet_aton(host) + struct.pack("!BBH", 0, 6, len(hdr))
    hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP).sendto(hdr, (host, 0))
print(sport, flush=True)
sys.stdin.readline()
"""


def add_v6(pair):
    """Static IPv6 addresses on the veth, usable at once (nodad)."""
    for ns, dev, addr in ((pair.sender, pair.veth_s, V6_SENDER), (pair.receiver, pair.veth_r, V6_RECEIVER)):
        pair.ns(ns, "ip", "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")


@pytest.mark.parametrize("ip", ["v4", "v6"])
@pytest.mark.parametrize("where", ["ahead", "behind"])
def test_segment_outside_the_receive_window(bpf, ip, where):
    """An ACK with a sequence number 2^30 past what an ESTABLISHED receiver
    expects, or 2^30 before it, sent with a raw socket across a veth:
    tcp_sequence() rejects it. Ahead it is TCP_INVALID_SEQUENCE; behind,
    kernels whose table has TCP_OLD_SEQUENCE (6.12 and 6.18 do, 6.1 does
    not) say so, the others TCP_INVALID_SEQUENCE. Timestamps are off so that PAWS, which comes
    first, has nothing to say."""
    table = reason_table()
    reason = "TCP_OLD_SEQUENCE" if where == "behind" and "TCP_OLD_SEQUENCE" in table else "TCP_INVALID_SEQUENCE"
    src, dst, version = NS_HOSTS[ip]
    port, offset = 8474, (1 << 30) if where == "ahead" else -(1 << 30)
    with LinkPair() as pair:
        if ip == "v6":
            add_v6(pair)
        for ns in (pair.sender, pair.receiver):
            pair.ns(ns, "sysctl", "-qw", "net.ipv4.tcp_timestamps=0")
        with Tracer("drops", "-o", "json", "-L", str(port)) as t:
            server = Endpoint("server", dst, port, netns=pair.receiver)
            client = subprocess.Popen(["ip", "netns", "exec", pair.sender, sys.executable, "-c", OUT_OF_WINDOW, dst,
                                       str(port), str(offset)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            try:
                line = client.stdout.readline()
                assert line.strip().isdigit(), client.stderr.read()
                sport = int(line)
                wait_for(t, f'"{reason}"', 1)
                assert t.stop() == 0, t.stderr
            finally:
                client.communicate("\n", timeout=10)
                server.kill()
        rows = t.json_rows()
        assert rows == [segment(version, src, sport, dst, port, "A", reason, pid=server.pid, comm=rows[0]["comm"],
                                state="ESTABLISHED", work=own_workload(f"/run/netns/{pair.receiver}"))], rows
    assert rows[0]["comm"] == sys.executable.rsplit("/", 1)[-1][:15]


# -- TCP-MD5: a SYN without the signature the listener requires --------------------

MD5_LISTENER = r"""
import socket, struct, sys
host, port, peer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
v6 = ":" in host
family = socket.AF_INET6 if v6 else socket.AF_INET
l = socket.socket(family)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((host, port))
if v6:  # struct sockaddr_in6
    addr = struct.pack("=H", family) + struct.pack("!HI", 0, 0) + socket.inet_pton(family, peer) + bytes(4)
else:  # struct sockaddr_in
    addr = struct.pack("=H", family) + struct.pack("!H", 0) + socket.inet_aton(peer)
key = b"tcptrace-md5-key"
# struct tcp_md5sig: the peer (a sockaddr_storage), flags, prefix length, key length, ifindex, key
l.setsockopt(socket.IPPROTO_TCP, 14, addr.ljust(128, b"\0") + struct.pack("=BBHi", 0, 0, len(key), 0)
             + key.ljust(80, b"\0"))  # TCP_MD5SIG
l.listen(8)
print("listening", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_syn_without_the_listeners_md5_signature(bpf, ip):
    """A listener holding a TCP-MD5 key for its peer, and a client without
    one: the listener drops every SYN. kfree_skb names it
    (TCP_MD5NOTFOUND, in the tables of 6.1, 6.12 and 6.18), which is why tcp_hash_md5_required is not
    attached: it would report the same segment twice."""
    host, family, version = HOSTS[ip]
    table = reason_table()
    assert "TCP_MD5NOTFOUND" in table, f"this kernel names no TCP-MD5 drop: {sorted(table)}"
    port, cport = free_port(family, host), free_port(family, host)
    with Tracer("drops", "-o", "json", "-L", str(port)) as t:
        server = subprocess.Popen([sys.executable, "-c", MD5_LISTENER, host, str(port), host],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening", server.stderr.read()
            client = Endpoint("client", host, port, "--bind-port", cport, "--syncnt", 1, "--give-up", 1.5)
            assert client.outcome() in ("timeout", "gave-up")
            assert t.stop() == 0, t.stderr
        finally:
            server.communicate("\n", timeout=10)
    rows = t.json_rows()
    comm = sys.executable.rsplit("/", 1)[-1][:15]
    expected = segment(version, host, cport, host, port, "S", "TCP_MD5NOTFOUND", pid=server.pid, comm=comm,
                       state="LISTEN", work=own_workload())
    assert len(rows) >= 1 and rows == [expected] * len(rows), rows
