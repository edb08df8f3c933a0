"""A TCP endpoint that ends its connection the ways the reset, connect and
accept tests need, run as its own process so it has its own PID.

    endpoint.py server HOST PORT [--hold] [--accept N] [--abort-unread]
    endpoint.py client HOST PORT [--hold] [--bind-port C] [--send N]
                                 [--linger0 | --close-first] [--syncnt N] [--give-up S]

--hold waits for a line on stdin before listening or connecting, so a test
can start a tracer filtered on this PID first. A server prints "listening",
then serves --accept connections: with --abort-unread it waits for the
client's data and closes without reading it (the kernel aborts with a RST);
otherwise it reads until the client closes or resets. A client prints how
its connect ended (ok, refused, timeout, gave-up); once connected it sends
--send bytes, then closes with SO_LINGER 0 (a RST) under --linger0, closes
at once under --close-first, or else waits for the server to close or reset. Everything is bounded by --timeout.
"""

import argparse
import errno
import os
import select
import socket
import struct
import subprocess
import sys


class Endpoint:
    """This script in its own process, as the tests drive it."""

    def __init__(self, role, host, port, *extra, hold=False, netns=None):
        cmd = [sys.executable, os.path.abspath(__file__), role, host, str(port), *map(str, extra)]
        if hold:
            cmd.append("--hold")
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]  # which execs it: the PID stays
        self.role = role
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        if role == "server" and not hold:
            self._expect("listening")

    @property
    def pid(self):
        return self.proc.pid

    def go(self):
        """Let a --hold endpoint listen or connect."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        if self.role == "server":
            self._expect("listening")

    def _expect(self, word):
        line = self.proc.stdout.readline()
        if word not in line:
            self.kill()
            raise AssertionError(f"{self.role} did not start: {line!r} {self.proc.stderr.read()}")

    def outcome(self, timeout=30):
        """What a client printed: ok, refused, timeout or gave-up."""
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return out.strip()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def serve(args, family):
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.host, args.port))
    srv.listen(8)
    srv.settimeout(args.timeout)
    print("listening", flush=True)
    for _ in range(args.accept):
        conn, _ = srv.accept()
        conn.settimeout(args.timeout)
        if args.abort_unread:
            select.select([conn], [], [], args.timeout)
        else:
            drain(conn)
        conn.close()
    srv.close()


def drain(sock):
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def connect(args, family):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.syncnt:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, args.syncnt)
    sock.settimeout(args.give_up or args.timeout)
    if args.bind_port:
        sock.bind((args.host, args.bind_port))
    try:
        sock.connect((args.host, args.port))
    except ConnectionRefusedError:
        print("refused", flush=True)
        return
    except (socket.timeout, TimeoutError) as e:
        # The kernel's ETIMEDOUT (SYN retries ran out) and this socket's own
        # timeout are the same exception class since Python 3.10.
        print("timeout" if e.errno == errno.ETIMEDOUT else "gave-up", flush=True)
        sock.close()
        return
    print("ok", flush=True)
    sock.settimeout(args.timeout)
    if args.send:
        sock.sendall(b"c" * args.send)
    if args.linger0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif not args.close_first:
        drain(sock)
    sock.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=("client", "server"))
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--hold", action="store_true")
    p.add_argument("--accept", type=int, default=1)
    p.add_argument("--abort-unread", action="store_true")
    p.add_argument("--bind-port", type=int, default=0)
    p.add_argument("--send", type=int, default=0)
    p.add_argument("--linger0", action="store_true")
    p.add_argument("--close-first", action="store_true")
    p.add_argument("--syncnt", type=int, default=0)
    p.add_argument("--give-up", type=float, default=0)
    p.add_argument("--timeout", type=float, default=20)
    args = p.parse_args()
    if args.hold:
        sys.stdin.readline()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    if args.role == "server":
        serve(args, family)
    else:
        connect(args, family)
    return 0


if __name__ == "__main__":
    sys.exit(main())
