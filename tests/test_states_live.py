"""tcptrace states against real connections (root + BPF)."""

import socket
import subprocess
import sys

import pytest

from helpers import ROOT, Tracer, free_port, ready, session, tcptrace_cmd

CLIENT_FIRST = {
    "client": ["CLOSE>SYN_SENT", "SYN_SENT>ESTABLISHED", "ESTABLISHED>FIN_WAIT1",
               "FIN_WAIT1>FIN_WAIT2", "FIN_WAIT2>CLOSE"],
    "server": ["LISTEN>SYN_RECV", "SYN_RECV>ESTABLISHED", "ESTABLISHED>CLOSE_WAIT",
               "CLOSE_WAIT>LAST_ACK", "LAST_ACK>CLOSE"],
    "listener": ["CLOSE>LISTEN", "LISTEN>CLOSE"],
}
SERVER_FIRST = {
    "client": ["CLOSE>SYN_SENT", "SYN_SENT>ESTABLISHED", "ESTABLISHED>CLOSE_WAIT",
               "CLOSE_WAIT>LAST_ACK", "LAST_ACK>CLOSE"],
    "server": ["LISTEN>SYN_RECV", "SYN_RECV>ESTABLISHED", "ESTABLISHED>FIN_WAIT1",
               "FIN_WAIT1>FIN_WAIT2", "FIN_WAIT2>CLOSE"],
    "listener": ["CLOSE>LISTEN", "LISTEN>CLOSE"],
}
HOSTS = {"v4": ("127.0.0.1", socket.AF_INET, 4), "v6": ("::1", socket.AF_INET6, 6)}


def by_socket(rows, server_port, client_port):
    """Transitions per role: the listener, the accepted child, the client."""
    socks = {}
    for row in rows:
        socks.setdefault(row["skaddr"], []).append(row)
    roles = {}
    for sk, seq in socks.items():
        first = seq[0]
        if first["lport"] == client_port:
            role = "client"
        elif first["oldstate"] == "CLOSE" and first["newstate"] == "LISTEN":
            role = "listener"
        else:
            role = "server"
        assert role not in roles, f"two sockets look like the {role}: {rows}"
        roles[role] = [f"{r['oldstate']}>{r['newstate']}" for r in seq]
    return roles


@pytest.mark.parametrize("close_order", ["client-first", "server-first"])
@pytest.mark.parametrize("ip", ["v4", "v6"])
def test_exact_transitions(bpf, ip, close_order):
    host, family, version = HOSTS[ip]
    sport, cport = free_port(family, host), free_port(family, host)
    client_first = close_order == "client-first"
    with Tracer("states", "-o", "json", "-L", f"{sport},{cport}") as t:
        session(host, sport, cport, client_send=1000, server_send=2000, client_closes=client_first)
        assert t.stop() == 0, t.stderr
    rows = t.json_rows()
    assert by_socket(rows, sport, cport) == (CLIENT_FIRST if client_first else SERVER_FIRST)
    for row in rows:
        assert row["family"] == version
        assert row["laddr"] == host
        assert row["ms"] is None or row["ms"] >= 0
        assert isinstance(row["pid"], int) and isinstance(row["comm"], str)
    client = [r for r in rows if r["lport"] == cport]
    assert client[0]["pid"] > 0 and client[0]["comm"] == "python" or client[0]["comm"].startswith("python")
    established = [r for r in client if r["newstate"] == "ESTABLISHED"][0]
    assert established["rport"] == sport and established["raddr"] == host
    # One socket's changes arrive in the order they happened.
    assert [r["oldstate"] for r in client[1:]] == [r["newstate"] for r in client[:-1]]


def test_filters_in_kernel(bpf):
    """-D keeps only the remote port, -6 drops IPv4, -4 drops IPv6."""
    p4, c4 = free_port(), free_port()
    p6, c6 = free_port(socket.AF_INET6, "::1"), free_port(socket.AF_INET6, "::1")
    with Tracer("states", "-o", "json", "-D", str(p4)) as only_remote, \
            Tracer("states", "-o", "json", "-6", "-L", f"{p4},{c4},{p6},{c6}") as only_v6, \
            Tracer("states", "-o", "json", "-4", "-L", f"{p4},{c4},{p6},{c6}") as only_v4:
        session("127.0.0.1", p4, c4)
        session("::1", p6, c6)
        for t in (only_remote, only_v6, only_v4):
            assert t.stop() == 0, t.stderr
    remote = only_remote.json_rows()
    assert remote and all(r["rport"] == p4 for r in remote)
    assert {r["lport"] for r in remote} == {c4}
    assert only_v6.json_rows() and all(r["family"] == 6 for r in only_v6.json_rows())
    assert only_v4.json_rows() and all(r["family"] == 4 for r in only_v4.json_rows())
    assert {r["lport"] for r in only_v4.json_rows()} == {p4, c4}


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_table_and_csv(bpf, fmt):
    sport, cport = free_port(), free_port()
    with Tracer("states", "-o", fmt, "-T", "-t", "-w", "-L", str(cport)) as t:
        session("127.0.0.1", sport, cport)
        assert t.stop() == 0, t.stderr
    lines = t.stdout.splitlines()
    assert len(lines) == 6  # a header and the client's five changes
    if fmt == "table":
        assert lines[0].split() == ["TIME", "TIME(s)", "SKADDR", "C-PID", "C-COMM", "IP", "LADDR", "LPORT",
                                    "RADDR", "RPORT", "OLDSTATE", "->", "NEWSTATE", "MS"]
        cells = lines[2].split()
        assert cells[5] == "4" and cells[6] == "127.0.0.1" and cells[7] == str(cport)
        assert cells[10:13] == ["SYN_SENT", "->", "ESTABLISHED"]
    else:
        assert lines[0] == ("time,timestamp,skaddr,pid,comm,family,laddr,lport,raddr,rport,oldstate,newstate,ms,"
                            "cgroup_id,cgroup,container,pod_uid,netns")
        assert lines[2].split(",")[10:12] == ["SYN_SENT", "ESTABLISHED"]


def test_closed_pipe_ends_quietly(bpf):
    """`tcptrace states | head -1`: status 0 and no traceback."""
    sport, cport = free_port(), free_port()
    proc = subprocess.Popen(
        " ".join(tcptrace_cmd("states", "-L", str(cport), "--duration", "20", "--verbose")) + " | head -1",
        shell=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        executable="/bin/bash",
    )
    ready(proc)
    session("127.0.0.1", sport, cport)
    session("127.0.0.1", free_port(), cport)
    out, err = proc.communicate(timeout=30)
    assert out.startswith("SKADDR")
    assert "Traceback" not in err
    proc2 = subprocess.run(
        " ".join(tcptrace_cmd("states", "--max-events", "1", "--duration", "20")) + " | true; "
        "echo ${PIPESTATUS[0]}", shell=True, cwd=ROOT, capture_output=True, text=True, executable="/bin/bash",
    )
    assert proc2.stdout.strip() == "0" and "Traceback" not in proc2.stderr


def test_duration_and_max_events(bpf):
    sport, cport = free_port(), free_port()
    with Tracer("states", "-o", "json", "--max-events", "2", "-L", str(cport)) as t:
        session("127.0.0.1", sport, cport)
        assert t.wait() == 0
    assert len(t.json_rows()) == 2
    with Tracer("states", "--duration", "0.5", "-L", str(cport)) as t:
        assert t.wait(timeout=20) == 0


@pytest.mark.parametrize("buffer", ["ring", "perf"])
def test_both_buffers(bpf, buffer):
    sport, cport = free_port(), free_port()
    with Tracer("states", "-o", "json", "--buffer", buffer, "-L", str(cport)) as t:
        session("127.0.0.1", sport, cport)
        assert t.stop() == 0
    assert f"{buffer} buffer" in t.stderr
    assert [f"{r['oldstate']}>{r['newstate']}" for r in t.json_rows()] == CLIENT_FIRST["client"]


def test_rows_reach_a_pipe_while_running(bpf):
    """Piped output is flushed per poll batch, not when the buffer fills or
    the tool exits: a reader sees a row while the tracer keeps running."""
    import time

    sport, cport = free_port(), free_port()
    with Tracer("states", "-o", "csv", "-L", str(cport)) as t:
        session("127.0.0.1", sport, cport)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and t.stdout_so_far.count("\n") < 6:
            time.sleep(0.05)
        seen_while_running = t.stdout_so_far.count("\n")
        assert t.proc.poll() is None
        t.stop()
    assert seen_while_running == 6


def test_filtered_out_change_still_times_the_next(bpf):
    """connect() without bind() reaches SYN_SENT with local port 0, which
    -L filters out; the next change must still know when it began. The only
    ephemeral port in a private network namespace makes the port known."""
    import json

    port = 47123
    script = f"""
import json, signal, socket, subprocess
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
open("/proc/sys/net/ipv4/ip_local_port_range", "w").write("{port} {port}")
tracer = subprocess.Popen({tcptrace_cmd("states", "-o", "json", "-L", str(port), "--verbose")!r},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
for line in tracer.stderr:  # until it says tracing has begun
    if line.endswith("; Ctrl-C to end\\n"):
        break
srv = socket.create_server(("127.0.0.1", 5000))
c = socket.create_connection(srv.getsockname())
a, _ = srv.accept()
c.close(); a.close(); srv.close()
# Until the client's last change (to CLOSE, from FIN_WAIT2) is out; an alarm
# ends a wait that would never end.
signal.alarm(60)
seen = []
for line in tracer.stdout:
    seen.append(line)
    row = json.loads(line)
    if row["lport"] == {port} and row["newstate"] == "CLOSE":
        break
signal.alarm(0)
tracer.send_signal(2)
print("".join(seen) + tracer.communicate(timeout=30)[0])
"""
    result = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    client = [r for r in rows if r["lport"] == port and r["rport"] != 0]
    assert [f"{r['oldstate']}>{r['newstate']}" for r in client][:1] == ["SYN_SENT>ESTABLISHED"]
    assert all(r["ms"] is not None for r in client), client
