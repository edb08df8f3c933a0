#!/usr/bin/env python3
"""tcptrace probe under load: iperf3 on loopback, the throughput it reaches
with a tracer of tcp:tcp_probe attached against none, in one run.

  none                       no tracer
  tcptrace probe --hist rtt  a log2 histogram of srtt, kept in the kernel
  tcptrace probe             default events: one row per socket per 100 ms
  bpftrace                   tracepoint:tcp:tcp_probe { @ = hist(args->srtt); }

Each repetition runs every tracer once, in an order that rotates between
repetitions, with `iperf3 -c 127.0.0.1 -t SECONDS`; the throughput is the
receiver's. Reported per tracer: the median throughput and its spread, the
median of the per-repetition ratios to `none` (each ratio taken against the
baseline of the same repetition), the tracer's own CPU seconds during the
load, and the losses it reported. A tracer's BPF programs run on the CPUs of
iperf3's softirqs: their cost shows in the throughput, and exactly in the
kernel's own accounting (kernel.bpf_stats_enabled, turned on for the run and
restored): the seconds its programs ran and the nanoseconds per run of the
busiest one (tcp_probe's), which a busy machine does not blur as it blurs
throughput, and the runs the kernel skipped because a program was already
running on that CPU (recursion misses: every tracer has them; tcptrace
reports them as lost, bpftrace does not).

    python bench/probe.py [--repeat 3] [--seconds 5] [--json PATH]

The markdown report goes to stdout, the results (every round, the medians
and spreads, machine and versions) to PATH, by default
bench/results/probe-<date>.json; `make bench` puts them into
docs/performance.md (bench/run.py --page).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (  # noqa: E402
    bpf_stats, cpu_seconds, load_record, prog_ids, prog_stats, stop_process, tracer_env, write_json,
)

ROOT = HERE.parent
RESULTS = HERE / "results"
BPFTRACE = "tracepoint:tcp:tcp_probe { @ = hist(args->srtt); }"
READY_S = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tracers():
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    tcptrace = [python, "-m", "tcptrace", "probe"]
    return {
        "none": None,
        "tcptrace probe --hist rtt": tcptrace + ["--hist", "rtt"],
        "tcptrace probe": tcptrace,
        "bpftrace hist(srtt)": ["bpftrace", "-e", BPFTRACE],
    }


def wait_ready(proc, name):
    """Until the tracer says it is attached: tcptrace's "Ctrl-C to end" on
    stderr, bpftrace's "Attaching" on stdout. Returns the stderr lines
    collected by a reader thread from then on."""
    ready = threading.Event()
    err_lines = []

    def read(stream, marker):
        for line in iter(stream.readline, ""):
            if stream is proc.stderr:
                err_lines.append(line)
            if marker in line:
                ready.set()
        ready.set()

    marker = "Attaching" if name.startswith("bpftrace") else "Ctrl-C to end"
    stream = proc.stdout if name.startswith("bpftrace") else proc.stderr
    threading.Thread(target=read, args=(stream, marker), daemon=True).start()
    if stream is not proc.stderr:
        threading.Thread(target=lambda: err_lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    if not ready.wait(READY_S) or proc.poll() is not None:
        raise SystemExit(f"{name} did not attach: {''.join(err_lines)}")
    time.sleep(0.5)  # bpftrace prints before its attach completes
    return err_lines


def iperf(port, seconds):
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise SystemExit(f"iperf3 failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]


def bpf_cost(before, after):
    """(seconds the programs ran, ns per run of the busiest, its runs, runs
    the kernel skipped) between two prog_stats()."""
    deltas = [tuple(a - b for a, b in zip(after[i], before.get(i, (0, 0, 0)))) for i in after]
    busiest = max(deltas, key=lambda d: d[1], default=(0, 0, 0))
    return (sum(d[0] for d in deltas) / 1e9, (busiest[0] / busiest[1] if busiest[1] else 0.0), busiest[1],
            sum(d[2] for d in deltas))


def one(name, argv, port, seconds):
    if argv is None:
        return {"bps": iperf(port, seconds), "cpu_s": 0.0, "lost": 0, "bpf_s": 0.0, "ns_per_run": 0.0, "runs": 0,
                "skipped": 0}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if name.startswith("bpftrace") else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=tracer_env(), cwd=ROOT)
    try:
        err = wait_ready(proc, name)
        ids = prog_ids(proc.pid)
        stats0 = prog_stats(ids)
        cpu0 = cpu_seconds(proc.pid)
        bps = iperf(port, seconds)
        cpu = cpu_seconds(proc.pid) - cpu0
        bpf_s, ns_per_run, runs, skipped = bpf_cost(stats0, prog_stats(ids))
    finally:
        stop_process(proc)
    text = "".join(err)
    lost = sum(int(n) for n in re.findall(r"(\d+) events lost", text))
    return {"bps": bps, "cpu_s": cpu, "lost": lost, "bpf_s": bpf_s, "ns_per_run": ns_per_run, "runs": runs,
            "skipped": skipped, "stderr": text[-2000:]}


def spread(values):
    return f"{min(values) / 1e9:.2f}-{max(values) / 1e9:.2f}"


def render(results, seconds, repeat):
    lines = [f"iperf3 on loopback, {seconds} s per run, {repeat} repetitions "
             f"({datetime.date.today().isoformat()}, {os.uname().release}, {os.cpu_count()} CPUs)", "",
             "| tracer | Gbit/s median (min-max) | ratio to none, median (min-max) | tracer CPU s | "
             "BPF CPU s | ns per probe (min-max) | probes | skipped by the kernel | lost (reported) |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = results["none"]
    for name, runs in results.items():
        bps = [r["bps"] for r in runs]
        ratios = [r["bps"] / b["bps"] for r, b in zip(runs, base)]
        cpu = statistics.median(r["cpu_s"] for r in runs)
        bpf_s = statistics.median(r["bpf_s"] for r in runs)
        ns = [r["ns_per_run"] for r in runs]
        lines.append(f"| {name} | {statistics.median(bps) / 1e9:.2f} ({spread(bps)}) | "
                     f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | {cpu:.2f} | "
                     f"{bpf_s:.3f} | {statistics.median(ns):.0f} ({min(ns):.0f}-{max(ns):.0f}) | "
                     f"{statistics.median(r['runs'] for r in runs):.0f} | "
                     f"{sum(r['skipped'] for r in runs)} | {sum(r['lost'] for r in runs)} |")
    return "\n".join(lines) + "\n"


# The columns of its own table that the page repeats: per round.
COLUMNS = [
    {"key": "cpu_s", "label": "tracer CPU s", "fmt": ".2f", "agg": "median"},
    {"key": "bpf_s", "label": "BPF CPU s", "fmt": ".3f", "agg": "median"},
    {"key": "ns_per_run", "label": "ns per probe", "fmt": ".0f", "agg": "spread"},
    {"key": "runs", "label": "probes", "fmt": ".0f", "agg": "median"},
    {"key": "skipped", "label": "skipped by the kernel", "fmt": "d", "agg": "sum"},
    {"key": "lost", "label": "lost (reported)", "fmt": "d", "agg": "sum"},
]


def record(results, seconds, repeat):
    """The results as bench/run.py's load_record() has them."""
    tracers = []
    for name, runs in results.items():
        role = "baseline" if name == "none" else "tcptrace" if name.startswith("tcptrace") else "anchor"
        tracers.append({"label": "no tracer" if role == "baseline" else name, "role": role,
                        "rounds": [{"value": r["bps"], **{k: v for k, v in r.items() if k != "bps"}} for r in runs]})
    return load_record("probe", "iperf3 on loopback", "Gbit/s", ".2f", tracers, COLUMNS,
                       {"repetitions": repeat, "seconds per run": seconds}, scale=1e9, packages=("iperf3",))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="where the results go (default bench/results/probe-<date>.json)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.seconds < 1:
        parser.error("--repeat and --seconds must be at least 1")
    if os.geteuid() != 0:
        raise SystemExit("bench/probe.py needs root (BPF)")
    for tool in ("iperf3", "bpftrace"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install {tool} (make test-deps)")
    table = tracers()
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {name: [] for name in table}
    try:
        with bpf_stats():  # for the whole run, all tracers alike
            time.sleep(0.5)
            names = list(table)
            for rep in range(args.repeat):
                order = names[rep % len(names):] + names[: rep % len(names)]
                for name in order:
                    results[name].append(one(name, table[name], port, args.seconds))
                    print(f"# {rep + 1}/{args.repeat} {name}: {results[name][-1]['bps'] / 1e9:.2f} Gbit/s",
                          file=sys.stderr, flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        stop_process(server)
    report = render(results, args.seconds, args.repeat)
    sys.stdout.write(report)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_json(args.json or RESULTS / f"probe-{stamp}.json", record(results, args.seconds, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
