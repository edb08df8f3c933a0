"""tcptrace exporter --top-cgroups against real cgroup v2 directories (root +
BPF + a cgroup2 mount): each process moves into its cgroup before it makes
a socket, so every count has one right cgroup, also what the kernel does in
softirq (a listener's children, the resets they receive or send). The
exporter runs unfiltered (the machine's other traffic is in other cgroups);
`tcptrace resets` alongside is the reference for resets."""

import os

from helpers import Tracer, free_port
from test_exporter_live import Exporter, series, settled, value
from test_workload_live import Worker, ino, rel, tree  # noqa: F401 (tree: a fixture)

N = 3  # sessions from the container's clients
SESSIONS = "tcptrace_cgroup_sessions_total"
CONNECTS = "tcptrace_cgroup_connects_total"
RESETS = "tcptrace_cgroup_resets_total"
RETRANSMITS = "tcptrace_cgroup_retransmits_total"


def of_cgroup(samples, label):
    """{(sample name, other labels): value} of one cgroup's series."""
    out = {}
    for (name, labels), v in samples.items():
        d = dict(labels)
        if d.pop("cgroup", None) == label:
            out[(name, tuple(sorted(d.items())))] = v
    return out


def cgroups_served(samples):
    return {dict(labels)["cgroup"] for (name, labels) in samples if name.startswith("tcptrace_cgroup_")}


def test_counts_per_cgroup(tree):  # noqa: F811
    port, aborting, closed = free_port(), free_port(), free_port()
    server, other, child = rel(tree, "server"), rel(tree, "other"), rel(tree, "child")
    container = tree["container"]
    with Exporter("--top-cgroups", "10") as exp, Exporter("--top-cgroups", "1", "-D", str(port)) as one, \
            Tracer("resets", "-o", "json") as resets:
        listener = Worker(tree["server"], "server", "127.0.0.1", port, N, "keep")
        for _ in range(N):
            Worker(tree["client"], "client", "127.0.0.1", port, 1000).wait()
        listener.wait()
        aborter = Worker(tree["child"], "server", "127.0.0.1", aborting, 1, "abort")
        Worker(tree["parent"], "client", "127.0.0.1", aborting, 0).wait()
        aborter.wait()
        Worker(tree["other"], "client", "127.0.0.1", closed, 0).wait()

        samples = settled(exp, lambda s: value(s, SESSIONS, cgroup=container) == N and
                          value(s, CONNECTS, cgroup=other, result="FAILED") == 1 and
                          value(s, SESSIONS, cgroup=child) == 1, "every cgroup's sessions")
        top1 = settled(one, lambda s: value(s, SESSIONS, cgroup=container) == N, "the container's sessions")
        assert resets.stop() == 0, resets.stderr
        rows = resets.json_rows()

        # The container's clients: labelled with the container id, not the path.
        assert of_cgroup(samples, container) == {
            (SESSIONS, ()): N, (CONNECTS, (("result", "OK"),)): N, (CONNECTS, (("result", "FAILED"),)): 0,
            (RETRANSMITS, ()): 0, (RESETS, (("direction", "sent"),)): 0, (RESETS, (("direction", "received"),)): 0}
        # The listener's children carry the listener's cgroup: sessions, no connect.
        assert of_cgroup(samples, server) == {
            (SESSIONS, ()): N, (CONNECTS, (("result", "OK"),)): 0, (CONNECTS, (("result", "FAILED"),)): 0,
            (RETRANSMITS, ()): 0, (RESETS, (("direction", "sent"),)): 0, (RESETS, (("direction", "received"),)): 0}
        # The refused connect: a session, a failed connect, the reset it received. The
        # reset sent for the closed port had no socket: no cgroup.
        assert of_cgroup(samples, other) == {
            (SESSIONS, ()): 1, (CONNECTS, (("result", "OK"),)): 0, (CONNECTS, (("result", "FAILED"),)): 1,
            (RETRANSMITS, ()): 0, (RESETS, (("direction", "sent"),)): 0, (RESETS, (("direction", "received"),)): 1}
        # A child cgroup counts on its own; the aborting child socket sent the reset.
        sent_by_child = [r for r in rows if r["dir"] == "SENT" and r["cgroup_id"] == ino(tree["child"])]
        assert sent_by_child and value(samples, RESETS, cgroup=child, direction="sent") == len(sent_by_child)
        assert value(samples, RESETS, cgroup=rel(tree, "parent"), direction="received") == \
            len([r for r in rows if r["dir"] == "RECV" and r["cgroup_id"] == ino(tree["parent"])]) >= 1
        assert value(samples, CONNECTS, cgroup=rel(tree, "parent"), result="OK") == 1
        # K = 1: the busiest cgroup only (-D: the container's clients beat none else).
        assert cgroups_served(top1) == {container}
        assert samples[("tcptrace_lost_events_total", ())] == 0

        # A removed cgroup's series end at the next scrape.
        os.rmdir(tree["other"])
        assert other not in cgroups_served(exp.scrape())
        assert value(exp.scrape(), SESSIONS, cgroup=container) == N
    for e in (exp, one):
        assert e.returncode == 0 and "Traceback" not in e.stderr, e.stderr
    assert series(samples, "tcptrace_untracked_sockets_total") == {}
