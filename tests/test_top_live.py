"""tcptrace top against real traffic (root + BPF, Linux 6.3+): the bytes a
sender moved with send() and sendfile() over IPv4 and IPv6 and nginx's own
access log are the ground truth; nothing is lost between intervals."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import jsonschema
import pytest

from helpers import Tracer, free_port, must_run
from tcptrace import events

N, M = 1_000_000, 500_000

# One process receives, another sends N bytes with send() and M with
# sendfile(); each says its PID once connected and waits for a line on stdin
# before it ends, so both are alive (and their comm readable) until asked.
RECEIVER = textwrap.dedent("""
    import socket, sys
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    srv = socket.socket(family)
    srv.bind((sys.argv[1], int(sys.argv[2])))
    srv.listen()
    print("listening", flush=True)
    conn, _ = srv.accept()
    got = 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        got += len(data)
    conn.close()
    print(got, flush=True)
    sys.stdin.readline()
""")
SENDER = textwrap.dedent("""
    import os, socket, sys, tempfile, time
    host, port, n, m, chunk, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
        int(sys.argv[5]), float(sys.argv[6])
    s = socket.create_connection((host, port))
    print(s.getsockname()[1], flush=True)
    sent = 0
    while sent < n:
        step = min(chunk, n - sent)
        s.sendall(b"x" * step)
        sent += step
        time.sleep(pause)
    with tempfile.TemporaryFile() as f:
        f.write(b"y" * m)
        f.flush()
        done = 0
        while done < m:
            done += os.sendfile(s.fileno(), f.fileno(), done, m - done)
    s.close()
    sys.stdin.readline()
""")


def spawn(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def comm(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def transfer(host, n=N, m=M, chunk=1 << 20, pause=0.0):
    """A receiver and a sender process moving n + m bytes; returns
    (receiver pid, its comm, sender pid, its comm, server port, client port)."""
    port = free_port(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    receiver = spawn(RECEIVER, host, port)
    assert receiver.stdout.readline().strip() == "listening"
    sender = spawn(SENDER, host, port, n, m, chunk, pause)
    client_port = int(sender.stdout.readline())
    assert int(receiver.stdout.readline()) == n + m
    out = (receiver.pid, comm(receiver.pid), sender.pid, comm(sender.pid), port, client_port)
    for proc in (receiver, sender):
        proc.communicate("\n", timeout=30)
        assert proc.returncode == 0
    return out


def rows_of(tracer):
    return tracer.json_rows()


def so_far(tracer):
    """The rows printed so far (complete lines only)."""
    text = tracer.stdout_so_far
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].split("\n") if line]


def connection(rows, lport, rport):
    return [r for r in rows if r["lport"] == lport and r["rport"] == rport]


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft202012Validator(json.loads(events.shipped()))


@pytest.mark.parametrize("host,flag", [("127.0.0.1", "-4"), ("::1", "-6")])
def test_send_and_sendfile_bytes_are_exact(bpf, host, flag, validator):
    with Tracer("top", "-o", "json", "-i", "0.5", "-C", flag) as tracer:
        rpid, rcomm, spid, scomm, port, cport = transfer(host)
        tracer.stop(settle=0.6)
    objects = tracer.json_objects()
    for obj in objects:
        assert not list(validator.iter_errors(obj)), obj
    rows = rows_of(tracer)
    assert {r["family"] for r in rows} == {6 if ":" in host else 4}
    sent = connection(rows, cport, port)
    received = connection(rows, port, cport)
    assert sum(r["tx_bytes"] for r in sent) == N + M and sum(r["rx_bytes"] for r in sent) == 0
    assert sum(r["rx_bytes"] for r in received) == N + M and sum(r["tx_bytes"] for r in received) == 0
    assert {(r["pid"], r["comm"]) for r in sent} == {(spid, scomm)}
    assert {(r["pid"], r["comm"]) for r in received} == {(rpid, rcomm)}
    assert {r["laddr"] for r in sent + received} == {host} and not any(r["tx_acked"] for r in rows)
    for r in sent + received:
        assert r["bytes"] == r["rx_bytes"] + r["tx_bytes"] and r["count"] >= 1 and 0.3 < r["interval_s"] < 2


def test_intervals_lose_nothing(bpf):
    """A sender across many short intervals: the intervals add up to every
    byte sent, though each read and clear ran while it was sending."""
    with Tracer("top", "-o", "json", "-i", "0.1", "-C", "-4") as tracer:
        _rpid, _rcomm, _spid, _scomm, port, cport = transfer("127.0.0.1", n=3_000_000, m=0, chunk=8192,
                                                             pause=0.001)
        tracer.stop(settle=0.3)
    rows = rows_of(tracer)
    sent = connection(rows, cport, port)
    assert len({r["interval_start"] for r in sent}) >= 5, "the transfer spans many intervals"
    assert sum(r["tx_bytes"] for r in sent) == 3_000_000
    assert sum(r["rx_bytes"] for r in connection(rows, port, cport)) == 3_000_000


def test_a_connection_that_opens_and_closes_inside_an_interval_is_shown(bpf):
    with Tracer("top", "-o", "json", "-i", "3", "-C", "-4") as tracer:
        time.sleep(0.2)
        _rpid, _rcomm, spid, _scomm, port, cport = transfer("127.0.0.1", n=4321, m=0)
        # Both sockets are destroyed now, well inside the 3 s interval.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not connection(so_far(tracer), cport, port):
            time.sleep(0.2)
        tracer.stop(settle=0)
    [row] = connection(rows_of(tracer), cport, port)
    assert row["tx_bytes"] == 4321 and row["pid"] == spid


def test_by_pid_adds_up_the_connections(bpf):
    pids = []
    with Tracer("top", "-o", "json", "-i", "0.5", "-C") as conns, \
            Tracer("top", "-o", "json", "-i", "0.5", "-C", "--by", "pid") as procs:
        for host in ("127.0.0.1", "::1", "127.0.0.1"):
            rpid, _rc, spid, _sc, _port, _cport = transfer(host, n=200_000, m=100_000)
            pids += [rpid, spid]
        conns.stop(settle=0.6)
        procs.stop(settle=0.6)
    per_conn, per_pid = {}, {}
    for r in rows_of(conns):
        if r["pid"] in pids:
            per_conn[r["pid"]] = [a + b for a, b in zip(per_conn.get(r["pid"], [0, 0]), (r["rx_bytes"], r["tx_bytes"]))]
    for r in rows_of(procs):
        assert r["laddr"] is None and r["lport"] is None and r["rport"] is None
        if r["pid"] in pids:
            per_pid[r["pid"]] = [a + b for a, b in zip(per_pid.get(r["pid"], [0, 0]), (r["rx_bytes"], r["tx_bytes"]))]
    assert per_conn == per_pid and len(per_pid) == 6
    assert sorted(v for v in per_pid.values()) == sorted([[300_000, 0]] * 3 + [[0, 300_000]] * 3)


def test_the_table_redraws_only_on_a_terminal(bpf):
    """Into a pipe: one block per interval, no escape codes, --count ends it."""
    result = subprocess.run([sys.executable, "-m", "tcptrace", "top", "-i", "0.2", "--count", "3", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "\033" not in result.stdout
    assert result.stdout.count("loadavg:") == 3 and result.stdout.count("RX_KB") == 3


NGINX_CONF = """
daemon off;
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    log_format sent '$pid $remote_port $bytes_sent';
    access_log {dir}/access.log sent;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
    }}
}}
"""


def test_nginx_bytes_sent_equal_its_access_log(bpf):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        if must_run():
            pytest.fail("nginx is not installed (make test installs nginx-light)")
        pytest.skip("nginx is not installed")
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(f"{d}/www")
        with open(f"{d}/www/big", "wb") as f:
            f.write(os.urandom(1 << 20))
        port = free_port()
        with open(f"{d}/nginx.conf", "w") as f:
            f.write(NGINX_CONF.format(dir=d, port=port))
        server = subprocess.Popen([nginx, "-c", f"{d}/nginx.conf", "-e", f"{d}/error.log"],
                                  stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and server.poll() is None, "nginx did not start"
                    time.sleep(0.05)
            with Tracer("top", "-o", "json", "-i", "0.5", "-C", "-L", str(port)) as tracer:
                for _ in range(50):
                    with socket.create_connection(("127.0.0.1", port)) as s:
                        s.sendall(b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n")
                        while s.recv(1 << 16):
                            pass
                tracer.stop(settle=0.6)
        finally:
            server.terminate()
            server.wait(10)
        with open(f"{d}/access.log") as f:
            log = [line.split() for line in f if line.strip()]
    assert len(log) == 50
    worker = {int(pid) for pid, _port, _sent in log}
    rows = rows_of(tracer)
    assert rows and {r["pid"] for r in rows} == worker and {r["comm"] for r in rows} == {"nginx"}
    assert sum(r["tx_bytes"] for r in rows) == sum(int(sent) for _pid, _port, sent in log)
    by_port = {}
    for r in rows:
        by_port[r["rport"]] = by_port.get(r["rport"], 0) + r["tx_bytes"]
    assert by_port == {int(p): int(sent) for _pid, p, sent in log}
