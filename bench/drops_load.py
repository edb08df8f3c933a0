"""What `tcptrace drops` costs a load that drops nothing: skb:kfree_skb
fires for every freed packet of every protocol, so the program must give up
on a non-TCP or non-drop packet before any other work. Loopback connections
at full speed (bench/loadgen.py), in rounds that alternate between no
tracer, `tcptrace drops` (also as it runs where the kernel's BTF does not
allow taking sock:inet_sock_set_state raw) and a bpftrace one-liner counting
the same tracepoint by reason; prints each one's median rate and its ratio to no
tracer in the same round (the bar: at least 0.97).

The kernel does report drops in such a load: the server closes first, and
the client's FIN, queued on the server's orphaned socket, is freed with it as
QUEUE_PURGE (about one segment per connection on 6.12 and later).
`tcptrace drops` leaves such segments without payload out in the kernel and
counts them; `tcptrace drops --reason NO_SOCKET` reaches the ring for none
either, through its reason filter.

    sudo python3 bench/drops_load.py [--rounds 10] [--seconds 2] [--pairs 2] [--json PATH] [--only TRACER]

After the rounds, --program-rounds more loads per tracer read its BPF
programs' run time per connection from the kernel's own account
(kernel.bpf_stats_enabled, on for those loads only): what the programs
cost, without the rate's noise.

With --json, the results (every round, each tracer's CPU per connection,
medians and spreads, machine and versions) go to PATH as well; `make bench`
puts them into docs/performance.md (bench/run.py --page).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from run import (  # noqa: E402
    bpf_stats, cpu_seconds, load_record, prog_ids, prog_stats, stop_process, write_json,
)

BPFTRACE = "tracepoint:skb:kfree_skb { @[args->reason] = count(); }"
# "tcptrace drops, <RECORD>": the state changes read from the tracepoint's
# record instead of taken raw (TCPTRACE_NO_RAW_TRACEPOINTS), the form a
# kernel without the BTF for the raw one gets: what the raw form saves.
RECORD = "state changes from the record"
TRACERS = ["none", "tcptrace drops", "tcptrace drops --reason NO_SOCKET", f"tcptrace drops, {RECORD}", "bpftrace"]


def load(seconds, pairs, port):
    """loadgen.py's summary of one load."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "loadgen.py"), "--rate", "max",
                          "--seconds", str(seconds), "--pairs", str(pairs), "--connections", str(10**8),
                          "--port", str(port)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def attach(which):
    """A tracer attached and ready, or None for no tracer."""
    if which == "none":
        return None
    if which.startswith("tcptrace drops"):
        command, _, form = which.partition(",")
        env = dict(os.environ, TCPTRACE_NO_RAW_TRACEPOINTS="1" if form.strip() == RECORD else "")
        proc = subprocess.Popen([sys.executable, "-m", "tcptrace", *command.split()[1:], "-o", "json"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        ready = "Ctrl-C to end"
    else:
        proc = subprocess.Popen(["bpftrace", "-e", BPFTRACE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        ready = "Attaching"
    tcptrace = which.startswith("tcptrace")
    stream = proc.stderr if tcptrace else proc.stdout
    for line in stream:
        if ready in line:
            if not tcptrace:
                time.sleep(0.5)  # bpftrace says Attaching before it is attached
            return proc
    raise SystemExit(f"{which} did not start (status {proc.wait()})")


def program_time(which, seconds, pairs, port):
    """The tracer's BPF programs' run time per connection of a load, in ns:
    the kernel's own account (bpf_stats(), on for the load only, since it
    costs every program two clock reads). None where bpftool cannot tell."""
    if not shutil.which("bpftool"):
        return None
    proc = attach(which)
    try:
        ids = prog_ids(proc.pid)
        with bpf_stats():
            before = prog_stats(ids)
            summary = load(seconds, pairs, port)
            after = prog_stats(ids)
    finally:
        stop_process(proc)
    if not after or not summary.get("connections"):
        return None
    spent = sum(ns - before.get(i, (0,))[0] for i, (ns, _runs, _missed) in after.items())
    return spent / summary["connections"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--port", type=int, default=24000)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--program-rounds", type=int, default=3, metavar="N",
                        help="then N more loads per tracer to read its programs' run time (0: none)")
    parser.add_argument("--only", action="append", metavar="TRACER", choices=TRACERS[1:],
                        help="only this tracer beside no tracer (repeatable): a closer look at fewer")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.pairs < 1:
        parser.error("--rounds, --seconds and --pairs must be positive")
    tracers = ["none"] + (args.only or [t for t in TRACERS[1:] if t != "bpftrace" or shutil.which("bpftrace")])
    rates = {t: [] for t in tracers}
    ratios = {t: [] for t in tracers}
    rounds = {t: [] for t in tracers}
    for r in range(args.rounds):
        order = tracers[r % len(tracers):] + tracers[: r % len(tracers)]
        got = {}
        for which in order:
            proc = attach(which)
            try:
                cpu0 = cpu_seconds(proc.pid) if proc else 0.0
                summary = load(args.seconds, args.pairs, args.port)
                cpu = cpu_seconds(proc.pid) - cpu0 if proc else None
            finally:
                if proc is not None:
                    stop_process(proc)
            got[which] = summary["rate"]
            rounds[which].append({"value": summary["rate"], "connections": summary.get("connections"),
                                  "cpu_s": cpu, "cpu_us_per_connection":
                                  1e6 * cpu / summary["connections"] if cpu is not None and summary.get("connections")
                                  else None})
        for which in tracers:
            rates[which].append(got[which])
            ratios[which].append(got[which] / got["none"])
    # Apart from the rounds above, whose rates the kernel's accounting would
    # slow: the same load once more per tracer and round.
    for r in range(min(args.program_rounds, args.rounds)):
        for which in tracers[1:]:
            rounds[which][r]["bpf_ns_per_connection"] = program_time(which, args.seconds, args.pairs, args.port)
    print(f"loopback connections at full speed, {args.pairs} pairs, {args.seconds:g} s, {args.rounds} rounds:")
    for which in tracers:
        spent = [x["bpf_ns_per_connection"] for x in rounds[which] if x.get("bpf_ns_per_connection") is not None]
        print(f"  {which:34} {statistics.median(rates[which]):9,.0f} conn/s  "
              f"ratio {statistics.median(ratios[which]):.3f} "
              f"({min(ratios[which]):.3f}-{max(ratios[which]):.3f})"
              + (f"  programs {statistics.median(spent):,.0f} ns per connection" if spent else ""))
    if args.json:
        columns = [{"key": "cpu_s", "label": "tracer CPU s", "fmt": ".3f", "agg": "median"},
                   {"key": "cpu_us_per_connection", "label": "tracer CPU per connection (us)", "fmt": ".2f",
                    "agg": "spread"},
                   {"key": "bpf_ns_per_connection", "label": "its BPF programs' run time per connection (ns)",
                    "fmt": ",.0f", "agg": "spread"}]
        roles = {"none": "baseline", "bpftrace": "anchor"}
        labels = {"none": "no tracer", "bpftrace": "bpftrace kfree_skb count by reason"}
        pairs = f"{args.pairs} client/server pair{'s' if args.pairs != 1 else ''}"
        rec = load_record("drops", f"loopback connections at full speed (bench/loadgen.py), {pairs}",
                          "conn/s", ",.0f",
                          [{"label": labels.get(t, t), "role": roles.get(t, "tcptrace"), "rounds": rounds[t]}
                           for t in tracers], columns,
                          {"rounds": args.rounds, "seconds per load": args.seconds, "pairs": args.pairs},
                          [] if "bpftrace" in tracers or args.only else ["bpftrace: not installed (apt-get install bpftrace)"])
        write_json(args.json, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
