"""Every subcommand's real JSON output validates against the shipped schema
(root + BPF): a session, a refused connect and an accept on loopback, and
retransmits (SYN-ACKs and data) in private namespaces."""

import datetime
import json

import jsonschema
import pytest

from endpoint import Endpoint
from helpers import Tracer, free_port, session, unwrap
from netns import RECEIVER_ADDR, SENDER_ADDR, LinkPair
from test_retrans_live import Processes, nstat, pin_client_port, ports, settle, wait_for
from tcptrace import events


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft202012Validator(json.loads(events.shipped()))


def check(validator, tracer, tool, count=False):
    objs = tracer.json_objects()
    assert objs, f"{tracer.args}: no output ({tracer.stderr})"
    for obj in objs:
        errors = [e.message for e in validator.iter_errors(obj)]
        assert not errors, (tracer.args, obj, errors)
        row = unwrap(obj, tool)
        assert ("count" in row) == count
    # One offset between the clocks per run: ts - ts_mono is the same on every line.
    offsets = {round(wall_seconds(o["ts"]) - o["ts_mono"], 3) for o in objs}
    assert max(offsets) - min(offsets) <= 0.002, offsets
    return objs


def wall_seconds(ts):
    at = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    return at.timestamp()


def test_loopback_tools(bpf, validator):
    sport, cport, closed, rport = free_port(), free_port(), free_port(), free_port()
    both = f"{sport},{cport}"
    runs = {
        ("states", False): Tracer("states", "-o", "json", "-T", "-t", "-L", both),
        ("life", False): Tracer("life", "-o", "json", "-x", "-L", both),
        ("accept", False): Tracer("accept", "-o", "json", "-L", str(sport)),
        ("connect", False): Tracer("connect", "-o", "json", "-D", f"{sport},{closed}"),
        ("resets", False): Tracer("resets", "-o", "json", "-L", f"{closed},{rport}"),
        ("resets", True): Tracer("resets", "-c", "-o", "json", "-L", f"{closed},{rport}"),
    }
    started = []
    try:
        for tracer in runs.values():
            started.append(tracer.__enter__())
        session("127.0.0.1", sport, cport, client_send=1000, server_send=100)
        assert Endpoint("client", "127.0.0.1", closed, "--bind-port", rport).outcome() == "refused"
        for tracer in started:
            assert tracer.stop() == 0, tracer.stderr
    finally:
        for tracer in started:
            tracer.__exit__(None, None, None)
    for (tool, count), tracer in runs.items():
        check(validator, tracer, tool, count)
    assert {r["result"] for r in runs[("connect", False)].json_rows()} == {"OK", "REFUSED"}
    assert len(runs[("life", False)].json_rows()) == 2


def test_retrans(bpf, validator):
    sport, cport = ports()
    both = f"{sport},{cport}"
    with LinkPair() as link, Processes(link) as procs:
        pin_client_port(link, cport)
        before = nstat(link, link.receiver, "TcpExtTCPSynRetrans")
        with Tracer("retrans", "-o", "json", "-t", "-L", both) as rows, \
                Tracer("retrans", "-c", "-o", "json", "-L", both) as counts:
            server = procs.peer(link.receiver, "server", RECEIVER_ADDR, sport, "--recv", 100_000)
            link.drop_input(link.receiver, f"ip saddr {SENDER_ADDR} tcp dport {sport} tcp flags & syn == 0")
            client = procs.peer(link.sender, "client", RECEIVER_ADDR, sport, "--send", 100_000, "--close-first")
            wait_for(lambda: nstat(link, link.receiver, "TcpExtTCPSynRetrans") > before, "a SYN-ACK retransmit")
            link.clear_rules(link.receiver)
            procs.finish(client)
            procs.finish(server)
            settle(link)
            for t in (rows, counts):
                assert t.stop() == 0, t.stderr
    objs = check(validator, rows, "retrans")
    assert "synack" in {o["type"] for o in objs}
    check(validator, counts, "retrans", count=True)
