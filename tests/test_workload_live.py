"""The socket's cgroup, container and network namespace on real events, and
--cgroup/--netns in the kernel (root + BPF + a cgroup2 mount).

Every process here moves itself (or is moved from outside, for one in a
network namespace: `ip netns exec` remounts /sys) into its cgroup before it
creates a socket, so the socket's cgroup is known: the rows must carry it,
also for what the kernel does in softirq (a listener's child, a retransmit,
a reset)."""

import os
import secrets
import subprocess
import sys
import time

import pytest

from helpers import Tracer, free_port
from netns import LinkPair, RECEIVER_ADDR
from tcptrace import workload

# One endpoint, in its own process: prints its PID, waits for a line on
# stdin (its cgroup is set by then), then acts.
WORKER = r"""
import os, socket, struct, sys
print(os.getpid(), flush=True)
sys.stdin.readline()
role, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    count, abort = int(sys.argv[4]), sys.argv[5] == "abort"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    print("listening", flush=True)
    for _ in range(count):
        c, _ = s.accept()
        if abort:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            while c.recv(65536):
                pass
        c.close()
    s.close()
else:
    size = int(sys.argv[4])
    try:
        c = socket.create_connection((host, port), timeout=20)
        c.sendall(b"x" * size)
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
        c.close()
    except OSError:
        pass
print("done", flush=True)
"""


class Worker:
    def __init__(self, cgroup, *args, netns=None):
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", WORKER, *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self.proc.stdout.readline())
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(self.pid))
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        if args[0] == "server":
            assert self.proc.stdout.readline().strip() == "listening"

    def wait(self, timeout=60):
        self.proc.wait(timeout)
        assert self.proc.returncode == 0


@pytest.fixture
def tree(bpf):
    """A cgroup tree of this test: base/server, base/docker-<64 hex>.scope,
    base/parent/child, base/other; removed at the end."""
    found = workload.cgroup2_mount()
    assert found, "no cgroup2 mount in /proc/self/mountinfo"
    mount = found[0]
    base = os.path.join(mount, f"tcptrace-test-{os.getpid()}-{secrets.token_hex(3)}")
    container = secrets.token_hex(32)
    dirs = {"server": "server", "client": f"docker-{container}.scope", "parent": "parent",
            "child": "parent/child", "other": "other"}
    paths = {k: os.path.join(base, v) for k, v in dirs.items()}
    for path in (base, *paths.values()):
        os.mkdir(path)
    paths.update(base=base, container=container, mount=os.path.realpath(mount))
    try:
        yield paths
    finally:
        for top, subdirs, _files in sorted(os.walk(base, topdown=False), key=lambda w: -w[0].count("/")):
            for attempt in range(50):
                try:
                    os.rmdir(top)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # a worker still exiting
                    time.sleep(0.1)


def rel(paths, key):
    return paths[key][len(paths["mount"]):]


def ino(path):
    return os.stat(path).st_ino


def check(row, paths, key, container=None):
    assert row["cgroup"] == rel(paths, key), row
    assert row["cgroup_id"] == ino(paths[key]), row
    assert row["container"] == container, row
    assert row["pod_uid"] is None
    assert row["netns"] == ino("/proc/self/ns/net"), row


def test_rows_carry_the_sockets_own_cgroup(tree):
    port, closed = free_port(), free_port()
    tools = {t: Tracer(t, "-o", "json") for t in ("life", "states", "resets")}
    for tracer in tools.values():
        tracer.__enter__()
    try:
        server = Worker(tree["server"], "server", "127.0.0.1", port, 2, "keep")
        Worker(tree["client"], "client", "127.0.0.1", port, 5000).wait()
        Worker(tree["client"], "client", "127.0.0.1", port, 0).wait()
        server.wait()
        aborter = Worker(tree["server"], "server", "127.0.0.1", port, 1, "abort")
        Worker(tree["client"], "client", "127.0.0.1", port, 0).wait()
        aborter.wait()
        Worker(tree["client"], "client", "127.0.0.1", closed, 0).wait()
    finally:
        for tracer in tools.values():
            tracer.stop()
    rows = {t: tracer.json_rows() for t, tracer in tools.items()}

    life = [r for r in rows["life"] if port in (r["lport"], r["rport"])]
    served = [r for r in life if r["lport"] == port]
    clients = [r for r in life if r["rport"] == port]
    assert len(served) == 3 and len(clients) == 3, life
    for row in served:
        check(row, tree, "server")
    for row in clients:
        check(row, tree, "client", tree["container"])

    states = [r for r in rows["states"] if port in (r["lport"], r["rport"])]
    passive = {(r["oldstate"], r["newstate"]) for r in states if r["lport"] == port}
    assert {("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED"), ("CLOSE", "LISTEN")} <= passive, states
    for row in states:
        if row["lport"] == port:
            check(row, tree, "server")
        else:
            check(row, tree, "client", tree["container"])

    resets = rows["resets"]
    sent = [r for r in resets if r["dir"] == "SENT" and r["lport"] == port]
    received = [r for r in resets if r["dir"] == "RECV" and port in (r["rport"], r["lport"])]
    refused = [r for r in resets if r["dir"] == "RECV" and r["rport"] == closed]
    assert sent and received and refused, resets
    for row in sent:
        check(row, tree, "server")
    for row in received + refused:
        check(row, tree, "client", tree["container"])


def test_cgroup_filter_takes_descendants_also_made_later(tree):
    port = free_port()
    with Tracer("life", "-o", "json", "--cgroup", tree["parent"]) as tracer:
        late = os.path.join(tree["parent"], "late")
        os.mkdir(late)  # after the program was loaded
        server = Worker(tree["server"], "server", "127.0.0.1", port, 3, "keep")
        Worker(tree["child"], "client", "127.0.0.1", port, 100).wait()
        Worker(late, "client", "127.0.0.1", port, 200).wait()
        Worker(tree["other"], "client", "127.0.0.1", port, 300).wait()
        server.wait()
        tracer.stop()
    rows = [r for r in tracer.json_rows() if port in (r["lport"], r["rport"])]
    assert sorted(r["cgroup"] for r in rows) == sorted([rel(tree, "child"), late[len(tree["mount"]):]]), rows
    assert all(r["rport"] == port for r in rows), "the server's cgroup is not below the parent"
    assert {r["cgroup_id"] for r in rows} == {ino(tree["child"]), ino(late)}


def test_a_namespaced_client_carries_its_netns_and_retransmits_their_cgroup(tree):
    with LinkPair() as pair:
        sender_ns = ino(f"/run/netns/{pair.sender}")
        receiver_ns = ino(f"/run/netns/{pair.receiver}")
        port = 5201
        pair.drop_input(pair.receiver, "ip saddr 198.18.0.1 tcp dport 5201 numgen random mod 10 < 2")
        life = Tracer("life", "-o", "json", "--netns", f"/run/netns/{pair.sender}")
        retrans = Tracer("retrans", "-o", "json")
        with life, retrans:
            server = Worker(tree["server"], "server", RECEIVER_ADDR, port, 1, "keep", netns=pair.receiver)
            Worker(tree["client"], "client", RECEIVER_ADDR, port, 3_000_000, netns=pair.sender).wait()
            server.wait()
            life.stop()
            retrans.stop()
    rows = [r for r in life.json_rows() if port in (r["lport"], r["rport"])]
    assert len(rows) == 1 and rows[0]["rport"] == port, rows  # the receiver's side is another netns
    assert rows[0]["netns"] == sender_ns != receiver_ns
    assert rows[0]["container"] == tree["container"]
    sent = [r for r in retrans.json_rows() if r["rport"] == port]
    assert sent, retrans.stderr
    for row in sent:
        assert row["netns"] == sender_ns
        assert row["cgroup"] == rel(tree, "client") and row["container"] == tree["container"]
        assert row["cgroup_id"] == ino(tree["client"])


@pytest.mark.parametrize("args,message", [
    (("--cgroup", "/nonexistent/cgroup"), "is not a directory of the cgroup v2 hierarchy"),
    (("--cgroup", "/tmp"), "is not a directory of the cgroup v2 hierarchy"),
    (("--netns", "/etc/hostname"), "is not a namespace file"),
    (("--netns", "/proc/self/ns/uts"), "not of a network namespace"),
])
def test_bad_paths_are_usage_errors(args, message):
    result = subprocess.run([sys.executable, "-m", "tcptrace", "life", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_table_shows_the_container(tree):
    port = free_port()
    with Tracer("life", "--show-cgroup", "-L", str(port)) as tracer:
        server = Worker(tree["server"], "server", "127.0.0.1", port, 1, "keep")
        Worker(tree["client"], "client", "127.0.0.1", port, 10).wait()
        server.wait()
        tracer.stop()
    lines = tracer.stdout.splitlines()
    assert lines[0].startswith("CGROUP ")
    rows = [line for line in lines[1:] if str(port) in line]
    assert len(rows) == 1, lines
    assert rows[0].startswith(workload.label(rel(tree, "server"), None).ljust(20) + " "), rows


def own_workload(netns=None):
    """The workload keys of a socket that a process of this test run (or one
    it started, which inherits its cgroup) opened; `netns` a namespace's
    file or inode for one started in that namespace."""
    mount = os.path.realpath(workload.cgroup2_mount()[0])
    with open("/proc/self/cgroup") as f:
        path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    container, pod = workload.container_of(path)
    return {"cgroup_id": os.stat(mount + path).st_ino, "cgroup": path, "container": container, "pod_uid": pod,
            "netns": netns if isinstance(netns, int) else os.stat(netns or "/proc/self/ns/net").st_ino}


NO_WORKLOAD = {"cgroup_id": None, "cgroup": None, "container": None, "pod_uid": None, "netns": None}
