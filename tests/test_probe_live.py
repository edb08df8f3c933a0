"""tcptrace probe against real bulk transfers on loopback (root + BPF): the
sender's rows, agreement with the kernel's own view (`ss -tin`), exact
bytes acked, histogram totals against an ftrace instance counting the same
tracepoint, the filters, a closed pipe and the JSON schema."""

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time

import jsonschema
import pytest

from helpers import ROOT, Tracer, free_port, tcptrace_cmd, unwrap
from tcptrace import events, tracefs

CHUNK = 64 * 1024


class Transfer:
    """A client on this host sending `size` bytes to a server thread here,
    then closing; `pace_s` between chunks makes it last. The sender's
    socket is the client's: port `client_port`."""

    def __init__(self, size, pace_s=0.0, family=socket.AF_INET):
        self.size, self.pace_s, self.family = size, pace_s, family
        self.host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.port = free_port(family, self.host)
        self.received = 0
        self.client_port = None
        self.sending = threading.Event()
        self.error = None

    def _serve(self, listener):
        conn, _ = listener.accept()
        with conn:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    return
                self.received += len(data)

    def _send(self):
        try:
            with socket.create_connection((self.host, self.port)) as client:
                self.client_port = client.getsockname()[1]
                self.sending.set()
                left, chunk = self.size, b"x" * CHUNK
                while left:
                    left -= client.send(chunk[: min(left, CHUNK)])
                    if self.pace_s:
                        time.sleep(self.pace_s)
        except Exception as e:  # seen by the test through done()
            self.error = e
            self.sending.set()

    def start(self):
        self.listener = socket.socket(self.family)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((self.host, self.port))
        self.listener.listen(1)
        self.server = threading.Thread(target=self._serve, args=(self.listener,), daemon=True)
        self.server.start()
        self.client = threading.Thread(target=self._send, daemon=True)
        self.client.start()
        assert self.sending.wait(10) and self.error is None, self.error
        return self

    def done(self, timeout=60):
        self.client.join(timeout)
        self.server.join(timeout)
        self.listener.close()
        assert self.error is None and self.received == self.size, (self.error, self.received)


def run(size, *args, pace_s=0.0, family=socket.AF_INET, during=None):
    """The tool with args while one transfer runs; (tracer, transfer)."""
    with Tracer("probe", *args) as tracer:
        transfer = Transfer(size, pace_s, family).start()
        if during:
            during(transfer, tracer)
        transfer.done()
        time.sleep(0.3)  # the close, and the last rows, reach the tool
        assert tracer.stop() == 0, tracer.stderr
    assert "lost" not in tracer.stderr and "Traceback" not in tracer.stderr, tracer.stderr
    return tracer, transfer


def sender_rows(tracer, transfer):
    return [r for r in tracer.json_rows() if r["lport"] == transfer.client_port and r["rport"] == transfer.port]


def test_rows_of_the_sending_socket(bpf):
    tracer, transfer = run(4_000_000, "-o", "json", pace_s=0.01)
    rows = sender_rows(tracer, transfer)
    assert len(rows) >= 3, tracer.stdout
    owners = {(r["pid"], r["laddr"], r["raddr"], r["family"]) for r in rows}
    assert owners == {(os.getpid(), "127.0.0.1", "127.0.0.1", 4)}
    # One row per socket per 100 ms at most, decided in the kernel.
    times = [o["ts_mono"] for o in tracer.json_objects() if o["lport"] == transfer.client_port]
    assert all(b - a >= 0.1 for a, b in zip(times, times[1:])), times
    for r in rows:
        assert r["cwnd"] > 0 and r["srtt_us"] > 0 and r["inflight"] >= 0 and r["snd_wnd"] > 0
        assert r["ca_state"] in ("Open", "Disorder", "CWR", "Recovery", "Loss")
        assert r["ssthresh"] is None or 0 < r["ssthresh"] < 0x7FFFFFFF


def _ss(transfer):
    """(CLOCK_MONOTONIC seconds, cwnd, srtt in microseconds) of the sending
    socket, as `ss -tin` shows it."""
    at = time.monotonic()
    out = subprocess.run(["ss", "-tinH", "state", "established", f"sport = :{transfer.client_port}"],
                         capture_output=True, text=True, check=True).stdout
    cwnd = re.search(r"\bcwnd:(\d+)", out)
    rtt = re.search(r"\brtt:([\d.]+)/", out)
    assert cwnd and rtt, out
    return at, int(cwnd.group(1)), float(rtt.group(1)) * 1000


def test_agrees_with_ss(bpf):
    samples = []

    def sample(transfer, tracer):
        for _ in range(6):
            time.sleep(0.4)
            samples.append(_ss(transfer))

    # Rows 10 ms apart: loopback's SRTT moves with the scheduler, so the
    # rows next to each `ss` sample are taken as close to it as the tool allows.
    tracer, transfer = run(16_000_000, "-o", "json", "--interval-ms", "10", pace_s=0.02, during=sample)
    rows = [(o["ts_mono"], unwrap(o, "probe")) for o in tracer.json_objects()
            if o["lport"] == transfer.client_port and o["rport"] == transfer.port]
    assert len(rows) >= 10, tracer.stdout
    for at, cwnd, srtt in samples:
        before = [r for t, r in rows if t <= at][-1:]
        after = [r for t, r in rows if t > at][:1]
        near = before + after
        assert near, (at, rows)
        # Equal, or the value on one side of a change.
        assert cwnd in {r["cwnd"] for r in near}, (cwnd, near)
        assert any(srtt / 1.5 <= r["srtt_us"] <= srtt * 1.5 for r in near), (srtt, near)


@pytest.mark.parametrize("size", [1, 100_000, 5_000_000])
def test_count_bytes_acked_is_the_transfer(bpf, size):
    tracer, transfer = run(size, "-c", "-o", "json", pace_s=0.001)
    rows = {(r["lport"], r["rport"]): r for r in tracer.json_rows()}
    client = rows[(transfer.client_port, transfer.port)]
    # The data and the FIN; never the SYN, which was acknowledged before the first probe.
    assert client["bytes_acked"] in (size, size + 1), client
    assert client["pid"] == os.getpid() and client["count"] >= 1
    assert client["srtt_min_us"] <= client["srtt_avg_us"] <= client["srtt_max_us"]
    server = rows.get((transfer.port, transfer.client_port))
    assert server is None or server["bytes_acked"] <= 1, server


@contextlib.contextmanager
def ftrace_count(port):
    """An ftrace instance of its own recording tcp:tcp_probe for one remote port:
    yields a function giving the hits so far (fails if its buffer overran)."""
    root = tracefs.find_mount()
    inst = os.path.join(root, "instances", f"tcptrace-probe-{os.getpid()}")
    os.mkdir(inst)
    try:
        with open(os.path.join(inst, "buffer_size_kb"), "w") as f:
            f.write("16384")
        event = os.path.join(inst, "events", "tcp", "tcp_probe")
        with open(os.path.join(event, "filter"), "w") as f:
            f.write(f"dport == {port}")
        with open(os.path.join(event, "enable"), "w") as f:
            f.write("1")

        def hits():
            with open(os.path.join(inst, "trace")) as f:
                text = f.read()
            written = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
            assert written and written.group(1) == written.group(2), "the ftrace buffer overran"
            return int(written.group(2))

        yield hits
    finally:
        with open(os.path.join(inst, "events", "tcp", "tcp_probe", "enable"), "w") as f:
            f.write("0")
        os.rmdir(inst)


@pytest.mark.parametrize("args", [("--hist", "rtt"), ("--hist", "cwnd", "--by", "rport")])
def test_histogram_counts_every_probe(bpf, args):
    port = free_port()
    with ftrace_count(port) as hits:
        with Tracer("probe", *args, "-o", "json", "-D", str(port)) as tracer:
            transfer = Transfer(3_000_000, pace_s=0.002)
            transfer.port = port
            transfer.start()
            transfer.done()
            time.sleep(0.3)
            seen = hits()
            assert tracer.stop() == 0, tracer.stderr
    objs = [unwrap(o, "probe") for o in tracer.json_objects()]
    assert seen > 20 and sum(o["count"] for o in objs) == seen, (seen, objs)
    for o in objs:
        assert o["hist"] == ("srtt_us" if "rtt" in args else "cwnd")
        assert o["count"] == sum(b[2] for b in o["buckets"])
    if "--by" in args:
        assert [o["rport"] for o in objs] == [port]


def test_table_histogram_at_exit(bpf):
    tracer, _transfer = run(2_000_000, "--hist", "rtt", pace_s=0.002)
    assert re.search(r"^     usecs               : count     distribution\n", tracer.stdout, re.M), tracer.stdout
    assert re.search(r"^ +\d+ -> \d+ +: \d+ +\|\*+ *\|$", tracer.stdout, re.M)


# Which sockets of two transfers (IPv4 and IPv6) each filter lets through.
# The receiving (server) side has probes too: one per data segment.
FILTERS = [
    (("-4",), {"v4", "v4-server"}),
    (("-6",), {"v6", "v6-server"}),
    (("-D", "{v4}"), {"v4"}),
    (("-L", "{v6}"), {"v6-server"}),
    (("-p", "{pid}"), {"v4", "v6", "v4-server", "v6-server"}),
]


@pytest.mark.parametrize("args,expected", FILTERS, ids=[" ".join(a) for a, _ in FILTERS])
def test_filters(bpf, args, expected):
    v4 = Transfer(1_000_000, 0.005)
    v6 = Transfer(1_000_000, 0.005, socket.AF_INET6)
    fill = {"v4": v4.port, "v6": v6.port, "pid": os.getpid()}
    with Tracer("probe", "-o", "json", *(a.format(**fill) for a in args)) as tracer:
        for t in (v4, v6):
            t.start()
        for t in (v4, v6):
            t.done()
        time.sleep(0.3)
        assert tracer.stop() == 0, tracer.stderr
    names = {(v4.client_port, v4.port): "v4", (v6.client_port, v6.port): "v6",
             (v4.port, v4.client_port): "v4-server", (v6.port, v6.client_port): "v6-server"}
    rows = tracer.json_rows()
    seen = {names.get((r["lport"], r["rport"]), "other") for r in rows}
    assert seen - {"other"} == expected, seen
    if args[0] in ("-4", "-6"):  # other loopback traffic of this machine may pass too, of that family only
        assert {r["family"] for r in rows} == {int(args[0][1])}
    else:
        assert "other" not in seen, rows


def test_closed_pipe_ends_quietly(bpf):
    transfer = Transfer(8_000_000, 0.005).start()
    cmd = " ".join(tcptrace_cmd("probe", "-q")) + " | head -1"
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    transfer.done()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TIME ") and result.stdout.count("\n") == 1
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft202012Validator(json.loads(events.shipped()))


@pytest.mark.parametrize("args", [(), ("-c",), ("-T", "-t", "-w")])
def test_json_validates_against_the_schema(bpf, validator, args):
    tracer, _transfer = run(1_000_000, "-o", "json", *args, pace_s=0.005)
    objs = tracer.json_objects()
    assert objs
    for obj in objs:
        assert not [e.message for e in validator.iter_errors(obj)], obj
