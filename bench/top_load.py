"""The load `tcptrace top` is judged by: many small messages over long-lived
connections (redis-benchmark with keep-alive against redis-server on
loopback), each send and receive a tracepoint hit. Prints the requests per
second without a tracer and with `tcptrace top` attached, in alternating
rounds of the same run, and their ratio (the bar: at least 0.95), then
whether bcc's tcptop-bpfcc runs here and why not.

    sudo python3 bench/top_load.py [--rounds 3] [--requests 300000] [--json PATH]

With --json, the results (every round, tcptrace top's CPU per request,
medians and spreads, machine and versions) go to PATH as well; `make bench`
puts them into docs/performance.md (bench/run.py --page).
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from run import StockHeaders, cpu_seconds, load_record, stop_process, write_json  # noqa: E402

LOST = re.compile(r"(\d+) events lost")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rps(port, requests, clients):
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(clients), "-n", str(requests),
                          "-t", "get,set", "-q", "-k", "1"], capture_output=True, text=True, check=True).stdout
    found = [float(v) for v in re.findall(r"([\d.]+) requests per second", out.replace("\r", "\n"))]
    return sum(found) / len(found)


def attach_top():
    proc = subprocess.Popen([sys.executable, "-m", "tcptrace", "top", "-o", "json", "-i", "1", "-C"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stderr:
        if "Ctrl-C to end" in line:
            return proc
    raise SystemExit(f"tcptrace top did not start (status {proc.wait()})")


def bcc_tcptop():
    """Whether bcc's tcptop runs here, and if not the first line that says why.
    Tried with the distribution's kernel headers linked as bench/run.py
    links them for the other stock tools, so the reason is the one that
    remains when headers are there."""
    tool = shutil.which("tcptop-bpfcc")
    if tool is None:
        return "not installed (bpfcc-tools)"
    headers = StockHeaders()
    headers.link()
    try:
        result = subprocess.run([tool, "-C", "1", "1"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "runs"
    finally:
        headers.unlink()
    if result.returncode == 0:
        return "runs"
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    why = next((line for line in lines if "kernel headers" in line or "kprobe" in line.lower()),
               lines[-1] if lines else "")
    with_headers = " with Debian's kernel headers linked" if headers.build else ""
    needs = "needs kprobes, which this kernel lacks: " if "kprobe" in why.lower() else ""
    return f"fails{with_headers} (status {result.returncode}): {needs}{why.strip()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1 or args.clients < 1:
        parser.error("--rounds, --requests and --clients must be at least 1")
    for needed in ("redis-server", "redis-benchmark"):
        if shutil.which(needed) is None:
            raise SystemExit(f"{needed} is missing: apt-get install redis-server redis-tools")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    without, with_top = [], []
    try:
        time.sleep(0.5)
        rps(port, 20_000, args.clients)  # warm up
        for _ in range(args.rounds):
            without.append({"value": rps(port, args.requests, args.clients)})
            top = attach_top()
            try:
                cpu0 = cpu_seconds(top.pid)
                rate = rps(port, args.requests, args.clients)
                cpu = cpu_seconds(top.pid) - cpu0
            finally:
                top.send_signal(signal.SIGINT)
                try:
                    err = top.communicate(timeout=30)[1]
                except subprocess.TimeoutExpired:
                    stop_process(top)
                    err = ""
            # -t get,set: --requests of each
            with_top.append({"value": rate, "cpu_s": cpu, "cpu_us_per_request": 1e6 * cpu / (2 * args.requests),
                             "lost": sum(int(n) for n in LOST.findall(err)), "stderr": err[-2000:]})
    finally:
        server.terminate()
        server.wait(10)
    base = statistics.median(r["value"] for r in without)
    traced = statistics.median(r["value"] for r in with_top)
    rounds = ", ".join(f"{a['value']:,.0f}/{b['value']:,.0f}" for a, b in zip(without, with_top))
    print(f"redis-benchmark GET/SET, {args.clients} keep-alive clients: {base:,.0f} req/s without a tracer, "
          f"{traced:,.0f} with tcptrace top: {traced / base:.3f}x (rounds: {rounds})")
    tcptop = bcc_tcptop()
    print(f"bcc tcptop-bpfcc: {tcptop}")
    if args.json:
        columns = [{"key": "cpu_s", "label": "tracer CPU s", "fmt": ".3f", "agg": "median"},
                   {"key": "cpu_us_per_request", "label": "tracer CPU per request (us)", "fmt": ".3f",
                    "agg": "spread"},
                   {"key": "lost", "label": "lost (reported)", "fmt": "d", "agg": "sum"}]
        tracers = [{"label": "no tracer", "role": "baseline", "rounds": without},
                   {"label": "tcptrace top", "role": "tcptrace", "rounds": with_top}]
        title = f"redis-benchmark GET/SET, {args.clients} keep-alive clients"
        missing = [] if tcptop == "runs" else [f"bcc tcptop-bpfcc: {tcptop}"]
        rec = load_record("top", title, "req/s", ",.0f", tracers, columns,
                          {"rounds": args.rounds, "requests of each": args.requests, "clients": args.clients},
                          missing, packages=("redis-server", "redis-tools"))
        if tcptop == "runs":
            rec["notes"] = ["bcc tcptop-bpfcc runs here but is not measured under this load"]
        write_json(args.json, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
