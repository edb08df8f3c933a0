#!/usr/bin/env python3
"""tcptrace's soak test: a million short loopback connections (issue 7).

Runs `tcptrace life` (when tcptrace has it) and `tcptrace states` with their
default settings, side by side, while loadgen.py makes --connections short
connections on 127.0.0.1 (3 KB up, 20 KB down, server closes first), then
reports for each tracer:

  - its RSS (VmRSS, and VmHWM) once attached and at the end;
  - every BPF map its process holds (found through /proc/<pid>/fdinfo): type,
    max_entries and current entries (counted with `bpftool map dump`), once
    attached and at the end, to show that no per-socket map leaks;
  - that every connection not reported as lost appears exactly once: the
    clients bind their own source ports, so each connection has its own
    (client port, server port) pair; life must print one row per connection
    per side, states ten rows per connection (five per side). Rows missing
    must be covered by the losses the tracer reported, and no connection may
    have more rows than it should.

Run as root: `python bench/soak.py` (bounded by --seconds; default one
million connections). Needs bpftool (Debian package bpftool, installed here
through scripts/apt-ensure.sh) for the entry counts.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # noqa: E402  (bench/run.py: the shared /proc and row helpers)

EXPECTED_PER_SIDE = {"states": 5, "life": 1}
CLIENT_PORTS = (10000, 29999)
SERVER_BASE = 30000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Soak tcptrace with a million short loopback connections (root).")
    p.add_argument("--connections", type=int, default=1_000_000, help="connections in all (default 1,000,000)")
    p.add_argument("--seconds", type=float, default=900, help="stop the load after this long (default 900 s)")
    p.add_argument("--pairs", type=int, default=2, help="client/server process pairs (default 2)")
    p.add_argument("--rate", default="4000",
                   help="connections per second in all, or max (default 4000: a rate the tracers can "
                        "follow, so the exactly-once check covers most connections)")
    p.add_argument("--tool", action="append", default=None, metavar="NAME",
                   help="tcptrace tools to run (repeat; default: life when tcptrace has it, and states)")
    p.add_argument("--no-install", action="store_true", help="do not install bpftool")
    p.add_argument("--keep", action="store_true", help="keep the tracers' raw output")
    p.add_argument("--out", default=str(bench.RESULTS), help="where the report goes (default bench/results)")
    args = p.parse_args(argv)
    if args.connections < 1 or args.pairs < 1:
        p.error("--connections and --pairs must be positive")
    return args


# -- maps ------------------------------------------------------------------------


def map_ids(pid):
    """IDs of the BPF maps a process holds open."""
    ids = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ids
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("map_id:"):
                        ids.append(int(line.split()[1]))
        except OSError:
            continue
    return sorted(set(ids))


def bpftool(*argv):
    out = subprocess.run(["bpftool", "-j"] + list(argv), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"bpftool exited {out.returncode}")
    return json.loads(out.stdout or "null")


def maps_of(pid):
    """name -> {type, max_entries, entries} for every map of the process."""
    out = {}
    have_bpftool = bool(bench.shutil.which("bpftool"))
    for mid in map_ids(pid):
        info = {"id": mid}
        try:
            if have_bpftool:
                show = bpftool("map", "show", "id", str(mid))
                info.update(name=show.get("name", f"id{mid}"), type=show.get("type"),
                            max_entries=show.get("max_entries"))
                if show.get("type") in ("ringbuf", "perf_event_array", "user_ringbuf"):
                    info["entries"] = None  # not a table: nothing to count
                elif show.get("type", "").endswith("array"):
                    info["entries"] = show.get("max_entries")  # arrays are always full
                else:
                    info["entries"] = len(bpftool("map", "dump", "id", str(mid)) or [])
            else:
                info.update(name=f"id{mid}", entries=None)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            info["error"] = str(e)[:200]
        out[info.get("name", f"id{mid}") + ("" if info.get("name") not in out else f"#{mid}")] = info
    return out


def rss(pid):
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    vals[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return vals


def snapshot(pid):
    return {"rss_kib": rss(pid), "maps": maps_of(pid), "cpu_s": bench.cpu_seconds(pid)}


# -- checking the rows -------------------------------------------------------------


class Tally:
    """Rows per connection and side, for the connections of the load."""

    def __init__(self, clients, server_ports):
        self.clo, self.chi = clients
        self.slo = server_ports[0]
        self.nserver = server_ports[1] - server_ports[0] + 1
        size = (self.chi - self.clo + 1) * self.nserver
        self.client = bytearray(size)
        self.server = bytearray(size)
        self.foreign = 0
        self.overflow = 0

    def index(self, cport, sport):
        if self.clo <= cport <= self.chi and 0 <= sport - self.slo < self.nserver:
            return (cport - self.clo) * self.nserver + (sport - self.slo)
        return None

    def add(self, lport, rport):
        try:
            lport, rport = int(lport), int(rport)
        except ValueError:
            self.foreign += 1
            return
        side = None
        i = self.index(lport, rport)
        if i is not None:
            side = self.client
        else:
            i = self.index(rport, lport)
            if i is not None:
                side = self.server
        if side is None:
            self.foreign += 1
        elif side[i] == 255:
            self.overflow += 1
        else:
            side[i] += 1


def check(path, tally):
    parser = bench.RowParser()
    with open(path, "rb") as f:
        for line in f:
            ports = parser.ports(line)
            if ports is not None:
                tally.add(*ports)
    return parser.n is not None


def verdict(tally, per_side, completed, failed_pairs, lost):
    """Connections with exactly the right rows, too few, too many."""
    failed = {tally.index(c, s) for c, s in failed_pairs if c}
    exact = short = extra = 0
    missing_rows = 0
    extra_rows = 0
    seen_rows = 0
    for i in range(len(tally.client)):
        c, s = tally.client[i], tally.server[i]
        if i in failed:
            continue
        if c == 0 and s == 0:
            continue  # never made (the load stopped early), or lost whole: counted below
        seen_rows += c + s
        if c == per_side and s == per_side:
            exact += 1
        elif c > per_side or s > per_side:
            extra += 1
            extra_rows += max(0, c - per_side) + max(0, s - per_side)
        else:
            short += 1
    expected_rows = completed * 2 * per_side
    missing_rows = expected_rows - (seen_rows - extra_rows)
    return {
        "connections": completed,
        "exact": exact,
        "short": short,
        "extra": extra,
        "untouched": completed - exact - short - extra,
        "expected_rows": expected_rows,
        "rows": seen_rows,
        "missing_rows": missing_rows,
        "extra_rows": extra_rows,
        "lost_reported": lost,
        "ok": extra == 0 and missing_rows <= lost,
    }


# -- the run -------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("soak: run as root (the tracers load BPF programs)")
    if not args.no_install:
        env = dict(os.environ, PACKAGES="bpftool")
        subprocess.run(["sh", str(bench.ROOT / "scripts" / "apt-ensure.sh")], env=env)
    registered = bench.tcptrace_tools()
    tools = args.tool or ([t for t in ("life",) if t in registered] + ["states"])
    for tool in tools:
        if tool not in EXPECTED_PER_SIDE:
            raise SystemExit(f"soak: no row check for tool {tool!r} (knows: {', '.join(EXPECTED_PER_SIDE)})")
        if tool not in registered:
            raise SystemExit(f"soak: tcptrace has no tool {tool!r}")
    nclient = CLIENT_PORTS[1] - CLIENT_PORTS[0] + 1
    per_client_ports = nclient // args.pairs
    per_client_conns = -(-args.connections // args.pairs)
    server_ports = max(1, -(-per_client_conns // per_client_ports))
    last_server = SERVER_BASE + args.pairs * server_ports - 1
    if last_server > 32767:
        raise SystemExit("soak: too many connections for unique port pairs below the ephemeral range")

    started = datetime.datetime.now()
    workdir = tempfile.mkdtemp(prefix="tcptrace-soak-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    procs = {}
    report = {"date": started.strftime("%Y-%m-%d %H:%M:%S"), "machine": bench.machine(),
              "versions": bench.versions(), "args": vars(args), "tracers": {}}
    try:
        for tool in tools:
            out = open(os.path.join(workdir, f"{tool}.out"), "wb")
            err = open(os.path.join(workdir, f"{tool}.err"), "wb")
            procs[tool] = bench.subprocess.Popen(bench.tcptrace_command() + [tool], stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=err, start_new_session=True,
                                                 env=bench.tracer_env(), cwd=workdir)
            out.close()
            err.close()
        deadline = time.monotonic() + 90
        for tool, proc in procs.items():
            while not bench.attached(proc.pid):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"soak: tcptrace {tool} did not attach")
                time.sleep(0.05)
        time.sleep(1.0)
        for tool, proc in procs.items():
            report["tracers"][tool] = {"start": snapshot(proc.pid)}
        bench.say(f"load: {args.connections} connections, {args.pairs} pairs, rate {args.rate}, "
                  f"client ports {CLIENT_PORTS[0]}-{CLIENT_PORTS[1]}, server ports {SERVER_BASE}-{last_server}")
        t0 = time.monotonic()
        cmd = [sys.executable, str(bench.LOADGEN), "--pairs", str(args.pairs), "--rate", str(args.rate),
               "--connections", str(args.connections), "--seconds", str(args.seconds),
               "--port", str(SERVER_BASE), "--server-ports", str(server_ports),
               "--client-ports", f"{CLIENT_PORTS[0]}-{CLIENT_PORTS[1]}", "--failed-list", "100000"]
        load_out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 300)
        try:
            load = json.loads(load_out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise SystemExit(f"soak: the load failed: {load_out.stderr.strip()[-500:]}")
        if "error" in load:
            raise SystemExit(f"soak: the load failed: {load['error']}")
        bench.say(f"load done: {load['connections']} connections in {load['elapsed']:.0f} s "
                  f"({load['rate']:.0f}/s), {load['failed'] + load['short']} failed; draining the tracers")
        for proc in procs.values():
            bench.wait_drained(proc.pid, 1.5, quiet_s=1.0, cap_s=120)
        for tool, proc in procs.items():
            report["tracers"][tool]["end"] = snapshot(proc.pid)
        for tool, proc in procs.items():
            report["tracers"][tool]["status"] = bench.stop_process(proc, grace=120)
        report["load"] = {k: v for k, v in load.items() if k != "failed_pairs"}
        report["load"]["wall_s"] = time.monotonic() - t0
        for tool in tools:
            with open(os.path.join(workdir, f"{tool}.err"), "rb") as f:
                errtext = f.read().decode(errors="replace")
            lost = bench.lost_so_far(errtext, "tcptrace")
            tally = Tally(CLIENT_PORTS, (SERVER_BASE, last_server))
            bench.say(f"checking the rows of tcptrace {tool}")
            found = check(os.path.join(workdir, f"{tool}.out"), tally)
            v = verdict(tally, EXPECTED_PER_SIDE[tool], load["connections"], load["failed_pairs"], lost)
            v["header_found"] = found
            v["other_rows"] = tally.foreign
            v["stderr_tail"] = errtext.strip().splitlines()[-4:]
            report["tracers"][tool]["check"] = v
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                bench.stop_process(proc)
        if not args.keep:
            bench.shutil.rmtree(workdir, ignore_errors=True)
        else:
            bench.say(f"raw output kept in {workdir}")
    report["elapsed_s"] = round((datetime.datetime.now() - started).total_seconds())
    text = render(report)
    sys.stdout.write(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "soak-" + started.strftime("%Y-%m-%d_%H%M%S"))
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    bench.say(f"report written to {stem}.md")
    ok = all(t.get("check", {}).get("ok") for t in report["tracers"].values())
    return 0 if ok else 1


def render(report):
    m = report["machine"]
    load = report.get("load", {})
    lines = [
        f"# tcptrace soak, {report['date']}",
        "",
        f"- machine: {m['nproc']} CPUs, {m['mem_mib']} MiB memory, kernel {m['kernel']}; "
        f"tcptrace {report['versions'].get('tcptrace')}",
        f"- load: {load.get('connections')} connections completed ({load.get('failed', 0) + load.get('short', 0)} "
        f"failed) in {load.get('elapsed', 0):.0f} s, {load.get('rate', 0):.0f} conn/s, {load.get('pairs')} pairs, "
        f"tracers {', '.join('tcptrace ' + t for t in report['tracers'])} side by side with default settings; "
        f"{report.get('elapsed_s')} s in all",
        "",
        "## Per tracer",
        "",
        "| tracer | RSS attached | RSS end | peak RSS | CPU | rows / expected | lost reported | "
        "connections exact / short / none / extra | every unreported connection exactly once |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tool, t in report["tracers"].items():
        s, e, c = t.get("start", {}), t.get("end", {}), t.get("check", {})
        lines.append(
            f"| tcptrace {tool} | {s.get('rss_kib', {}).get('VmRSS', 0) / 1024:.0f} MiB | "
            f"{e.get('rss_kib', {}).get('VmRSS', 0) / 1024:.0f} MiB | {e.get('rss_kib', {}).get('VmHWM', 0) / 1024:.0f} MiB | "
            f"{e.get('cpu_s', 0) - s.get('cpu_s', 0):.1f} s | {c.get('rows')} / {c.get('expected_rows')} | "
            f"{c.get('lost_reported')} | {c.get('exact')} / {c.get('short')} / {c.get('untouched')} / {c.get('extra')} | "
            f"{'yes' if c.get('ok') else 'NO'} |")
    lines += ["", "## BPF maps (entries once attached -> at the end)", "",
              "| tracer | map | type | max entries | entries attached | entries end |", "|---|---|---|---|---|---|"]
    for tool, t in report["tracers"].items():
        start = t.get("start", {}).get("maps", {})
        end = t.get("end", {}).get("maps", {})
        for name in sorted(set(start) | set(end)):
            a, b = start.get(name, {}), end.get(name, {})
            info = b or a

            def n(x):
                return "-" if x.get("entries") is None else str(x["entries"])
            lines.append(f"| tcptrace {tool} | {name} | {info.get('type', '?')} | {info.get('max_entries', '?')} | "
                         f"{n(a)} | {n(b)} |")
    lines.append("")
    lines.append("Entries of an array map are its size; a ring or perf buffer has none to count. A per-socket "
                 "map should end near its starting count: sockets other processes keep open stay in it.")
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
