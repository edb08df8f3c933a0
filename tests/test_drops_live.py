"""tcptrace drops against real drops of known reasons (root + BPF): a SYN to
a closed port, an nftables drop, a bad checksum, a full accept queue."""

import socket
import subprocess
import sys
import time

import pytest
from endpoint import Endpoint
from helpers import Tracer, free_port, tcptrace_cmd
from test_workload_live import NO_WORKLOAD, own_workload  # noqa: F401
from netns import RECEIVER_ADDR, SENDER_ADDR, LinkPair

from tcptrace import tracefs
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


def test_netfilter_drop_in_a_namespace(bpf):
    """An nftables rule on the receiver's input drops the SYNs to a
    listening port: NETFILTER_DROP, before any socket is looked up, so the
    owner is the listener on that port."""
    port = 8471
    with LinkPair() as pair:
        pair.drop_input(pair.receiver, f"tcp dport {port}")
        with Tracer("drops", "-o", "json", "-L", str(port)) as t:
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
