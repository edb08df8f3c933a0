#!/usr/bin/env python3
"""A loopback TCP load generator for tcptrace's benchmarks.

N server processes and N client processes, one client per server, all on
127.0.0.1 (or ::1). Each connection: the client connects and sends REQUEST
bytes, the server reads them all, answers RESPONSE bytes and closes first;
the client reads to end of file and closes. That is ten TCP state changes
per connection (five per side):

  client  CLOSE->SYN_SENT->ESTABLISHED->CLOSE_WAIT->LAST_ACK->CLOSE
  server  LISTEN->SYN_RECV->ESTABLISHED->FIN_WAIT1->FIN_WAIT2->CLOSE

The rate is either paced (connections per second in all, shared evenly by
the clients, each on its own schedule) or `max` (every client back to back).
A run ends at --connections or after --seconds, whichever comes first.
Each server listens on --server-ports consecutive ports starting at
--port + its index * --server-ports, so a run owns the port range
[--port, --port + pairs * server-ports), which is how tracer rows are
attributed to it. With --client-ports LO-HI the clients bind their source
ports themselves (split evenly between clients) so every connection of a run
has its own (client port, server port) pair as long as a client makes at
most (its ports x server ports) connections: soak.py relies on that to
check that each connection is reported exactly once.

Prints one JSON object on stdout: connections completed, failed, achieved
rate, elapsed seconds, port range and per-client details. Standard library
only: it must run with any python3, also while tcptrace is not installed.
"""

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import sys
import time

CHUNK = 65536


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2, help="client/server process pairs (default 2)")
    p.add_argument("--rate", default="max", help="connections per second in all, or 'max' (default)")
    p.add_argument("--connections", type=int, default=10000, help="stop after this many connections in all")
    p.add_argument("--seconds", type=float, default=10.0, help="stop after this many seconds")
    p.add_argument("--port", type=int, default=21000, help="first server port (default 21000)")
    p.add_argument("--server-ports", type=int, default=1, help="listening ports per server (default 1)")
    p.add_argument("--client-ports", default=None, metavar="LO-HI",
                   help="bind client source ports from this range (default: the kernel picks)")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) or ::1")
    p.add_argument("--request", type=int, default=3072, help="bytes the client sends (default 3072)")
    p.add_argument("--response", type=int, default=20480, help="bytes the server sends (default 20480)")
    p.add_argument("--failed-list", type=int, default=1000,
                   help="report at most this many failed (client port, server port) pairs")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1"):
        p.error("--host must be 127.0.0.1 or ::1: this generator only loads loopback")
    if args.rate != "max":
        try:
            args.rate = float(args.rate)
        except ValueError:
            p.error("--rate must be a number or 'max'")
        if args.rate <= 0:
            p.error("--rate must be positive")
    if not 1 <= args.pairs <= 256:
        p.error("--pairs must be 1..256")
    if args.connections < 1 or args.seconds <= 0:
        p.error("--connections and --seconds must be positive")
    if args.seconds > 3600:
        p.error("--seconds is at most 3600")
    last = args.port + args.pairs * args.server_ports - 1
    if args.port < 1024 or last > 65535 or args.server_ports < 1:
        p.error("server ports out of range")
    if args.client_ports:
        try:
            lo, hi = (int(x) for x in args.client_ports.split("-"))
        except ValueError:
            p.error("--client-ports is LO-HI")
        if not (1024 <= lo <= hi <= 65535) or hi - lo + 1 < args.pairs:
            p.error("--client-ports: a range of at least one port per client, within 1024-65535")
        if not (hi < args.port or lo > last):
            p.error("--client-ports overlaps the server ports")
        args.client_ports = (lo, hi)
    return args


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listeners(args):
    """All listening sockets, made before any fork so no client races them."""
    out = []
    fam = family_of(args.host)
    for i in range(args.pairs):
        group = []
        for k in range(args.server_ports):
            port = args.port + i * args.server_ports + k
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((args.host, port))
            except OSError as e:
                raise SystemExit(json.dumps({"error": f"cannot listen on {args.host} port {port}: {e.strerror}"}))
            s.listen(4096)
            group.append(s)
        out.append(group)
    return out


def serve(group, args):
    """One server process: accept, read the request, answer, close first."""
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    response = b"r" * args.response
    buf = bytearray(CHUNK)
    handled = 0
    sel = selectors.DefaultSelector()
    for s in group:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    give_up = time.monotonic() + args.seconds + 60
    while time.monotonic() < give_up:
        for key, _ in sel.select(1.0):
            try:
                conn, _ = key.fileobj.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                continue
            try:
                conn.setblocking(True)
                conn.settimeout(5.0)
                got = 0
                while got < args.request:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    got += n
                if got >= args.request:
                    conn.sendall(response)
                    handled += 1
            except OSError:
                pass
            finally:
                conn.close()
    os._exit(0)


def client(index, args, start_fd, result_fd):
    """One client process: connections back to back, or on its own schedule."""
    n = args.pairs
    share = args.connections // n + (1 if index < args.connections % n else 0)
    ports = [args.port + index * args.server_ports + k for k in range(args.server_ports)]
    fam = family_of(args.host)
    request = b"q" * args.request
    buf = bytearray(CHUNK)
    cports = None
    if args.client_ports:
        lo, hi = args.client_ports
        width = (hi - lo + 1) // n
        cports = range(lo + index * width, lo + (index + 1) * width)
    done = short = failed = 0
    errors = {}
    failed_pairs = []
    os.read(start_fd, 1)  # everyone starts together
    start = time.monotonic()
    deadline = start + args.seconds
    paced = args.rate != "max"
    if paced:
        interval = n / args.rate
        first = start + interval * index / n  # spread the clients' schedules
    nports = len(ports)
    for i in range(share):
        now = time.monotonic()
        if paced:
            due = first + i * interval
            if due > now:
                time.sleep(due - now)
                now = time.monotonic()
        if now >= deadline:
            break
        if cports is not None:
            cport = cports[i % len(cports)]
            sport = ports[(i // len(cports)) % nports]
        else:
            cport = 0
            sport = ports[i % nports]
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            if cport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((args.host, cport))
            s.connect((args.host, sport))
            s.sendall(request)
            got = 0
            while True:
                k = s.recv_into(buf)
                if not k:
                    break
                got += k
            if got == args.response:
                done += 1
            else:
                short += 1
                if len(failed_pairs) < args.failed_list:
                    failed_pairs.append((cport or s.getsockname()[1], sport))
        except OSError as e:
            failed += 1
            name = errno.errorcode.get(e.errno, str(e.errno))
            errors[name] = errors.get(name, 0) + 1
            if len(failed_pairs) < args.failed_list:
                failed_pairs.append((cport, sport))
        finally:
            s.close()
    elapsed = time.monotonic() - start
    out = {"index": index, "completed": done, "short": short, "failed": failed, "errors": errors,
           "elapsed": elapsed, "failed_pairs": failed_pairs}
    os.write(result_fd, (json.dumps(out) + "\n").encode())
    os._exit(0)


def run(args):
    groups = listeners(args)
    servers = []
    for group in groups:
        pid = os.fork()
        if pid == 0:
            for other in groups:
                if other is not group:
                    for s in other:
                        s.close()
            serve(group, args)
        servers.append(pid)
    for group in groups:
        for s in group:
            s.close()
    start_r, start_w = os.pipe()
    result_r, result_w = os.pipe()
    clients = []
    for i in range(args.pairs):
        pid = os.fork()
        if pid == 0:
            os.close(start_w)
            os.close(result_r)
            client(i, args, start_r, result_w)
        clients.append(pid)
    os.close(start_r)
    os.close(result_w)
    t0 = time.monotonic()
    os.write(start_w, b"g" * args.pairs)
    data = b""
    while True:
        chunk = os.read(result_r, CHUNK)
        if not chunk:
            break
        data += chunk
    elapsed = time.monotonic() - t0
    for pid in clients:
        os.waitpid(pid, 0)
    for pid in servers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in servers:
        os.waitpid(pid, 0)
    per = sorted((json.loads(line) for line in data.decode().splitlines() if line.strip()),
                 key=lambda r: r["index"])
    completed = sum(r["completed"] for r in per)
    errors = {}
    for r in per:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    busy = max((r["elapsed"] for r in per), default=elapsed)
    summary = {
        "pairs": args.pairs,
        "rate_target": args.rate,
        "connections": completed,
        "short": sum(r["short"] for r in per),
        "failed": sum(r["failed"] for r in per),
        "errors": errors,
        "elapsed": round(busy, 4),
        "rate": round(completed / busy, 1) if busy > 0 else 0.0,
        "host": args.host,
        "ports": [args.port, args.port + args.pairs * args.server_ports - 1],
        "server_ports": args.server_ports,
        "client_ports": list(args.client_ports) if args.client_ports else None,
        "failed_pairs": [p for r in per for p in r["failed_pairs"]],
        "per_client": [{k: r[k] for k in ("completed", "short", "failed", "elapsed")} for r in per],
    }
    return summary


def main(argv=None):
    args = parse_args(argv)
    summary = run(args)
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0 if summary["connections"] else 1


if __name__ == "__main__":
    sys.exit(main())
