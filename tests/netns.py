"""Two network namespaces joined by a veth pair, for tests that need real
packet loss (retransmits) without netem: the receiver's nftables input hook
drops a share of the sender's packets. Everything created here is removed on
exit, also when the test fails.

Addresses come from 198.18.0.0/15, the range set aside for benchmarking
(RFC 2544); they exist only inside these namespaces.
"""

import os
import subprocess
import sys
import time

from helpers import PEER

SENDER_ADDR = "198.18.0.1"
RECEIVER_ADDR = "198.18.0.2"


def sh(*args, check=True, **kwargs):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kwargs)


class LinkPair:
    """netns `<tag>-s` (the sender, 198.18.0.1) and `<tag>-r` (the receiver,
    198.18.0.2), one veth between them."""

    def __init__(self, tag=None):
        tag = tag or f"tt{os.getpid() % 100000}x{int(time.time() * 1000) % 100000}"
        self.sender = f"{tag}-s"
        self.receiver = f"{tag}-r"
        self.veth_s = f"{tag}a"[:15]
        self.veth_r = f"{tag}b"[:15]

    def __enter__(self):
        try:
            sh("ip", "netns", "add", self.sender)
            sh("ip", "netns", "add", self.receiver)
            sh("ip", "link", "add", self.veth_s, "netns", self.sender, "type", "veth",
               "peer", "name", self.veth_r, "netns", self.receiver)
            for ns, dev, addr in ((self.sender, self.veth_s, SENDER_ADDR),
                                  (self.receiver, self.veth_r, RECEIVER_ADDR)):
                self.ns(ns, "ip", "addr", "add", f"{addr}/30", "dev", dev)
                self.ns(ns, "ip", "link", "set", dev, "up")
                self.ns(ns, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def ns(self, name, *cmd, check=True):
        return sh("ip", "netns", "exec", name, *cmd, check=check)

    def drop_input(self, ns, rule):
        """Add an nftables rule on `ns`'s input hook: `rule` then drop."""
        self.ns(ns, "nft", "add", "table", "inet", "tcptrace_test")
        self.ns(ns, "nft", "add", "chain", "inet", "tcptrace_test", "input",
                "{ type filter hook input priority 0 ; policy accept ; }")
        self.ns(ns, "nft", "add", "rule", "inet", "tcptrace_test", "input", *rule.split(), "drop")

    def drop_output(self, ns, rule):
        """Add an nftables rule on `ns`'s output hook: `rule` then drop."""
        self.ns(ns, "nft", "add", "table", "inet", "tcptrace_test")
        self.ns(ns, "nft", "add", "chain", "inet", "tcptrace_test", "output",
                "{ type filter hook output priority 0 ; policy accept ; }")
        self.ns(ns, "nft", "add", "rule", "inet", "tcptrace_test", "output", *rule.split(), "drop")

    def lose_tcp(self, ns, match):
        """Drop one in five TCP segments matching `match` on `ns`'s input.
        TCP only: dropping ICMPv6 too would lose neighbour discovery, and an
        IPv6 connect() would fail with "No route to host"."""
        self.drop_input(ns, f"{match} meta l4proto tcp numgen random mod 10 < 2")

    def clear_rules(self, ns):
        self.ns(ns, "nft", "delete", "table", "inet", "tcptrace_test", check=False)

    def retrans_segs(self, ns):
        """The namespace's TcpRetransSegs counter (nstat)."""
        out = self.ns(ns, "nstat", "-az", "TcpRetransSegs").stdout
        for line in out.splitlines():
            if line.startswith("TcpRetransSegs"):
                return int(line.split()[1])
        return 0

    def peer(self, ns, role, host, port, *extra):
        """tests/peer.py inside a namespace; a server is awaited until it listens."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, PEER, role, host, str(port), *map(str, extra)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if role == "server":
            line = proc.stdout.readline()
            if "listening" not in line:
                proc.kill()
                raise AssertionError(f"server did not start: {proc.stderr.read()}")
        return proc

    def __exit__(self, *exc):
        for ns in (self.sender, self.receiver):
            sh("ip", "netns", "del", ns, check=False)
        return False
