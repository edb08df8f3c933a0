"""The load `tcptrace top` is judged by: many small messages over long-lived
connections (redis-benchmark with keep-alive against redis-server on
loopback), each send and receive a tracepoint hit. Prints the requests per
second without a tracer and with `tcptrace top` attached, in alternating
rounds of the same run, and their ratio (the bar: at least 0.95), then
whether bcc's tcptop-bpfcc runs here and why not.

    sudo python3 bench/top_load.py [--rounds 3] [--requests 300000]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """Whether bcc's tcptop runs here, and if not the first line that says why."""
    tool = shutil.which("tcptop-bpfcc")
    if tool is None:
        return "not installed (bpfcc-tools)"
    try:
        result = subprocess.run([tool, "-C", "1", "1"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "runs"
    if result.returncode == 0:
        return "runs"
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    why = next((line for line in lines if "kernel headers" in line or "kprobe" in line.lower()),
               lines[-1] if lines else "")
    return f"fails (status {result.returncode}): {why}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    for needed in ("redis-server", "redis-benchmark"):
        if shutil.which(needed) is None:
            raise SystemExit(f"{needed} is missing: apt-get install redis-server redis-tools")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        rps(port, 20_000, args.clients)  # warm up
        without, with_top = [], []
        for _ in range(args.rounds):
            without.append(rps(port, args.requests, args.clients))
            top = attach_top()
            try:
                with_top.append(rps(port, args.requests, args.clients))
            finally:
                top.send_signal(signal.SIGINT)
                top.wait(30)
    finally:
        server.terminate()
        server.wait(10)
    base, traced = statistics.median(without), statistics.median(with_top)
    print(f"redis-benchmark GET/SET, {args.clients} keep-alive clients: {base:,.0f} req/s without a tracer, "
          f"{traced:,.0f} with tcptrace top: {traced / base:.3f}x (rounds: "
          f"{', '.join(f'{a:,.0f}/{b:,.0f}' for a, b in zip(without, with_top))})")
    print(f"bcc tcptop-bpfcc: {bcc_tcptop()}")


if __name__ == "__main__":
    main()
