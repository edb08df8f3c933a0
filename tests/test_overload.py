"""Overload: a consumer that cannot keep up loses events, and every lost
event is counted. The tracer is frozen (SIGSTOP) while connections are made,
so a small buffer overflows for real; after it resumes, the rows it printed
plus the losses it reported must equal the events that happened."""

import os
import re
import signal
import time

import pytest

from helpers import Tracer, free_port
from tcptrace import errors

CONNECTIONS = 300
CHANGES = 5  # client side: CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE


def connect_many(port, count):
    import socket

    srv = socket.create_server(("127.0.0.1", port), backlog=1024)
    for _ in range(count):
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        c.close()
        a.close()
    srv.close()


@pytest.mark.parametrize("buffer,pages", [("ring", "1"), ("perf", "1")])
def test_every_loss_is_counted(bpf, buffer, pages, report):
    port = free_port()
    with Tracer("states", "-o", "json", "-D", str(port), "--buffer", buffer, "--buffer-pages", pages) as t:
        os.kill(t.proc.pid, signal.SIGSTOP)
        try:
            connect_many(port, CONNECTIONS)
            time.sleep(0.2)
        finally:
            os.kill(t.proc.pid, signal.SIGCONT)
        status = t.stop(settle=1.5)
    rows = t.json_rows()
    lost = [int(n) for n in re.findall(r"lost (\d+) events", t.stderr)]
    assert status == errors.EXIT_LOST_EVENTS, t.stderr
    assert sum(lost) > 0 and re.search(rf"{sum(lost)} events lost in all; {len(rows)} printed", t.stderr)
    assert len(rows) + sum(lost) == CONNECTIONS * CHANGES
    # What got through is still whole: every row is one of ours.
    assert all(r["rport"] == port for r in rows)
    report("Overload", f"tracer frozen (SIGSTOP) during {CONNECTIONS} connections, {buffer} buffer of {pages} page",
           f"{len(rows)} rows + {sum(lost)} reported lost = {CONNECTIONS * CHANGES} changes; exit {status}")
