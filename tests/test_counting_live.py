"""Count mode (-c) against real events (root + BPF): a count the kernel's
map cannot store is a lost event, reported on stderr with the lost-events
exit status, for every counting tool alike. The map is made small on purpose
(TCPTRACE_MAX_COUNTS) and given more distinct keys than it holds.

Retransmits: SYNs to a loopback listener whose accept queue is full are
dropped, and each client sends its SYN again after a second (a distinct
key per client port). Resets: connects to a closed loopback port (a reset
sent, and one received, per client port).
"""

import io
import json
import socket
import threading
import time

import pytest

from helpers import free_port
from tcptrace import output
from tcptrace.errors import EXIT_LOST_EVENTS, EXIT_OK
from tcptrace.runtime import RunOptions, Session
from tcptrace.tools import resets, retrans

CLIENTS = 8
SMALL = 2  # keys the small map holds; every client brings at least one more


def refused_connects(port, clients):
    for _ in range(clients):
        with socket.socket() as s:
            s.settimeout(5)
            with pytest.raises(ConnectionRefusedError):
                s.connect(("127.0.0.1", port))


def syn_retransmits(port, clients, listener):
    """Clients whose SYNs a full accept queue drops: each sends it again."""
    socks = []
    for _ in range(clients):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    time.sleep(2.5)  # the first SYN retransmit comes after 1 s (TCP_TIMEOUT_INIT)
    for s in socks:
        s.close()
    listener.close()


def run_counting(spec, traffic, max_counts=None):
    """The tool in count mode while `traffic` runs; (exit status, stdout, stderr)."""
    port = free_port()
    extra = {"TCPTRACE_MAX_COUNTS": max_counts} if max_counts else {}
    # Only the clients' side has the port as its remote one: their retransmits, the resets they receive.
    opts = RunOptions(count=True, family=socket.AF_INET, rports=(port,), duration=4, extra=extra)
    out, err = io.StringIO(), io.StringIO()
    writer = output.writer("json", out, spec.columns)
    session = Session(spec, opts, writer, err=err)
    listener = None
    try:
        session.open()
        if traffic == "synack-queue-full":
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(0)
            thread = threading.Thread(target=syn_retransmits, args=(port, CLIENTS, listener))
        else:
            thread = threading.Thread(target=refused_connects, args=(port, CLIENTS))
        thread.start()
        status = session.run()
        thread.join(10)
    finally:
        session.close()
        if listener is not None:
            listener.close()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows and {row["rport"] for row in rows} == {port}, out.getvalue()
    return status, rows, err.getvalue()


CASES = {"retrans": (retrans.SPEC, "synack-queue-full"), "resets": (resets.SPEC, "refused")}


@pytest.mark.parametrize("tool", sorted(CASES))
def test_a_count_the_map_cannot_hold_is_reported_lost(bpf, tool):
    spec, traffic = CASES[tool]
    status, rows, stderr = run_counting(spec, traffic, max_counts=SMALL)
    assert status == EXIT_LOST_EVENTS, stderr
    assert len(rows) == SMALL, rows
    lost = int(stderr.split(" events lost in all")[0].split()[-1])
    assert lost >= CLIENTS - 1 - SMALL, stderr


@pytest.mark.parametrize("tool", sorted(CASES))
def test_the_same_counts_fit_a_map_of_the_default_size(bpf, tool):
    spec, traffic = CASES[tool]
    status, rows, stderr = run_counting(spec, traffic)
    assert status == EXIT_OK, stderr
    assert "lost" not in stderr
    # One key per client; a listener with a backlog of 0 takes the first client in.
    assert len({row["lport"] for row in rows}) >= CLIENTS - 1, rows
    assert all(row["count"] >= 1 for row in rows)
