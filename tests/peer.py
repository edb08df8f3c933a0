"""One TCP endpoint for the privileged tests, run as its own process so
that client and server have their own PIDs and names.

    peer.py server HOST PORT --send N --recv M [--close-first [--half-close]]
    peer.py client HOST PORT --bind-port C --send N --recv M [--close-first [--half-close]]

The server prints "listening" once it listens. Each side sends --send
bytes, reads --recv bytes, then closes first (--close-first) or waits for the
peer's FIN and then closes. Everything is bounded by --timeout.
"""

import argparse
import socket
import sys


def recv_exactly(sock, n):
    got = 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            raise SystemExit(f"peer closed after {got} of {n} bytes")
        got += len(chunk)


def exchange(sock, args):
    # Send and receive at once would need threads; sizes in the tests are
    # small enough for socket buffers when the server sends after reading.
    if args.role == "client":
        sock.sendall(b"c" * args.send)
        recv_exactly(sock, args.recv)
    else:
        recv_exactly(sock, args.recv)
        sock.sendall(b"s" * args.send)
    if args.close_first and args.half_close:
        # The socket stays ours until the peer's FIN: a socket closed at once
        # becomes a TIME_WAIT mini-socket when its FIN is acknowledged, and
        # the peer's FIN may then miss its counters.
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
        sock.close()
    elif args.close_first:
        sock.close()
    else:
        while sock.recv(65536):
            pass
        sock.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=("client", "server"))
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bind-port", type=int, default=0)
    p.add_argument("--send", type=int, default=0)
    p.add_argument("--recv", type=int, default=0)
    p.add_argument("--close-first", action="store_true")
    p.add_argument("--half-close", action="store_true", help="with --close-first: shutdown, read to EOF, close")
    p.add_argument("--timeout", type=float, default=20)
    args = p.parse_args()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    if args.role == "server":
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((args.host, args.port))
        srv.listen(8)
        srv.settimeout(args.timeout)
        print("listening", flush=True)
        conn, _ = srv.accept()
        conn.settimeout(args.timeout)
        exchange(conn, args)
        srv.close()
    else:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(args.timeout)
        if args.bind_port:
            sock.bind((args.host, args.bind_port))
        sock.connect((args.host, args.port))
        exchange(sock, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
