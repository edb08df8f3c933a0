#!/usr/bin/env python3
"""tcptrace's benchmark: tcptrace side by side with bcc and bpftrace.

What `make bench` runs (as root). For every repetition, in an order that
rotates between repetitions, it runs a no-tracer baseline and each tracer:

  tcptrace <tool>        each tool given with --tool (default: states, and
                         life once tcptrace has it)
  bcc tcpstates, tcplife the stock tools (tcpstates-bpfcc, tcplife-bpfcc)
  bpftrace               a one-liner on sock:inet_sock_set_state

and measures for each:

  start-up    from process start until the tool prints its first row for a
              probe connection made every 20 ms (stdout on a pseudo-terminal,
              as a user watching it would see it)
  peak RSS    VmHWM of the tracer's process tree, sampled
  complete    rows for the load's ports / connections x rows per connection,
              for every load (paced or max rate, with 2, 4, 8 client/server
              pairs: see loadgen.py); stdout goes to a file, so each tool
              buffers as it does when redirected
  lost        the losses each tool reports on stderr, and for tcptrace
              whether rows seen + losses reported cover every expected row
  CPU/row     utime+stime of the tracer during a load / rows for that load
  slowdown    the load's achieved rate against the no-tracer baseline

The stock bcc tools need kernel headers, which do not exist for this kernel:
Debian's (older) headers are linked into /lib/modules/$(uname -r) only while
a stock tool starts and removed as soon as it is attached. tcplife's byte
columns are then garbage (wrong struct offsets): rows are counted, bytes not.

The report (markdown) goes to stdout and to bench/results/<date>.md (or
--out), with the raw numbers in a .json beside it. `--page DIR` then writes
docs/performance.md from a run's directory: this report, and the results
that probe.py, top_load.py and drops_load.py wrote there with --json, with
one table of every tcptrace tool against its best anchor (`make bench` does
all of it).
"""

import argparse
import collections
import contextlib
import datetime
import glob
import json
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOADGEN = HERE / "loadgen.py"
RESULTS = HERE / "results"
PERFORMANCE_PAGE = ROOT / "docs" / "performance.md"
PERFORMANCE_SECTION = "bench"

# Rows each connection of the load makes in a tool of this kind (connect
# and accept: the client's handshake and the server's).
ROWS_PER_CONNECTION = {"states": 10, "life": 2, "connect": 1, "accept": 1}
# The stock tool that each tcptrace tool is held against (connect and accept:
# bcc tcpstates, the yardstick of the CPU target, on the same connections).
BCC_TWIN = {"states": "bcc-tcpstates", "life": "bcc-tcplife", "connect": "bcc-tcpstates",
            "accept": "bcc-tcpstates"}

def packages():
    """Debian packages for the comparison: the stock tools, bpftrace, and the
    distribution's (older) kernel headers that the stock tools compile with."""
    try:
        arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    except OSError:
        arch = "amd64"
    return f"bpfcc-tools bpftrace linux-headers-{arch or 'amd64'}"

BPFTRACE_PROGRAM = (
    'BEGIN { printf("PID    COMM             LADDR           LPORT RADDR           RPORT OLDSTATE -> NEWSTATE\\n"); } '
    "tracepoint:sock:inet_sock_set_state /args->protocol == 6/ { "
    'printf("%-6d %-16s %-15s %-5d %-15s %-5d %d -> %d\\n", pid, comm, ntop(args->saddr), args->sport, '
    "ntop(args->daddr), args->dport, args->oldstate, args->newstate); }"
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.1


# Settings of this shell that would change how a tracer behaves: unbuffered
# Python output turns every row into a write(), no bytecode cache makes every
# start compile. A user's tracer has neither.
SCRUBBED_ENV = ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONPROFILEIMPORTTIME", "PYTHONDEVMODE",
                "PYTHONTRACEMALLOC", "PYTHONMALLOC", "TCPTRACE_DEBUG", "BCC_KERNEL_SOURCE")


def tracer_env():
    return {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}


def say(text):
    sys.stderr.write(f"bench: {text}\n")
    sys.stderr.flush()


# -- tracers -------------------------------------------------------------------


class Tracer:
    """A tool under test: how to start it and what its rows mean."""

    def __init__(self, name, argv, kind, needs_headers=False, lost_style="generic", label=None):
        self.name = name
        self.argv = argv
        self.kind = kind  # "states", "life", or None (no load rows expected)
        self.needs_headers = needs_headers
        self.lost_style = lost_style
        self.label = label or name

    @property
    def rows_per_connection(self):
        return ROWS_PER_CONNECTION.get(self.kind)


BASELINE = Tracer("none", None, None, label="no tracer")


def tcptrace_command():
    exe = Path(sys.executable).parent / "tcptrace"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tcptrace")
    return [found] if found else [sys.executable, "-m", "tcptrace"]


def tcptrace_tools():
    """The subcommands tcptrace has registered."""
    try:
        sys.path.insert(0, str(ROOT))
        from tcptrace.tools import TOOLS

        return list(TOOLS)
    except Exception:
        out = subprocess.run(tcptrace_command() + ["--help"], capture_output=True, text=True).stdout
        part = out.split("Commands:", 1)[-1]
        return [line.split()[0] for line in part.splitlines() if line.strip()]
    finally:
        if sys.path and sys.path[0] == str(ROOT):
            sys.path.pop(0)


def stock_tracers(wanted):
    out = []
    if "tcpstates" in wanted and shutil.which("tcpstates-bpfcc"):
        out.append(Tracer("bcc-tcpstates", [shutil.which("tcpstates-bpfcc")], "states", True, label="bcc tcpstates"))
    if "tcplife" in wanted and shutil.which("tcplife-bpfcc"):
        out.append(Tracer("bcc-tcplife", [shutil.which("tcplife-bpfcc")], "life", True, label="bcc tcplife"))
    if "bpftrace" in wanted and shutil.which("bpftrace"):
        out.append(Tracer("bpftrace", [shutil.which("bpftrace"), "-e", BPFTRACE_PROGRAM], "states",
                          label="bpftrace one-liner"))
    return out


# -- /proc ---------------------------------------------------------------------


def tree(pid):
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                with open(task) as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


def prog_ids(pid):
    """The BPF programs a process holds open (their fds' fdinfo)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                found = re.search(r"^prog_id:\s*(\d+)", f.read(), re.M)
        except OSError:
            continue
        if found:
            ids.add(int(found.group(1)))
    return ids


def prog_stats(ids):
    """{id: (run_time_ns, run_cnt, recursion_misses)}; the first two while
    kernel.bpf_stats_enabled is 1 (bpf_stats())."""
    out = {}
    for pid in ids:
        shown = subprocess.run(["bpftool", "prog", "show", "id", str(pid), "-j"], capture_output=True, text=True)
        if shown.returncode == 0:
            info = json.loads(shown.stdout)
            out[pid] = (info.get("run_time_ns", 0), info.get("run_cnt", 0), info.get("recursion_misses", 0))
    return out


@contextlib.contextmanager
def bpf_stats():
    """kernel.bpf_stats_enabled on inside the block, as it was after: the
    kernel then times every BPF program run (two clock reads each, for
    every tracer alike)."""
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    was = knob.read_text().strip()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(was)


def cpu_seconds(pid):
    """CPU time of a process tree, in seconds: the scheduler's exact run time
    of every thread (/proc/<pid>/task/<tid>/schedstat, in ns), which is what
    utime+stime count in 10 ms ticks; utime+stime where schedstat is absent."""
    total = 0.0
    for p in tree(pid):
        exact = 0
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/schedstat") as f:
                    exact += int(f.read().split()[0])
            total += exact / 1e9
            continue
        except (OSError, IndexError, ValueError):
            pass
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def hwm_kib(pid):
    """VmHWM of a process tree (the sum over its processes), in KiB."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def machine_busy():
    """CPU seconds the machine spent in user and system mode (not in
    interrupts, whose loopback work no process is charged for)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system = (int(x) for x in fields[1:4])
    return (user + nice + system) / CLK_TCK


def own_and_children():
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def attached(pid):
    """True once the process holds a perf event or BPF link: its tracepoint
    program is attached (every tool here attaches before it polls)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target in ("anon_inode:[perf_event]", "anon_inode:bpf_link"):
            return True
    return False


def machine():
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "mem_mib": mem, "cpu": model, "kernel": platform.release()}


def versions(packages=()):
    """tcptrace's commit, and the Debian versions of bcc, bpftrace and the
    given packages (a load's own tools)."""
    out = {}
    try:
        out["tcptrace"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        out["tcptrace"] = "?"
    for pkg in ("python3-bpfcc", "bpftrace", *packages):
        try:
            out[pkg] = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                                      text=True, timeout=10).stdout.strip() or "-"
        except Exception:
            out[pkg] = "-"
    return out


# -- kernel headers for the stock tools ----------------------------------------


class StockHeaders:
    """Links Debian's headers into /lib/modules/$(uname -r) for one stock
    tool's start, and removes exactly what it created."""

    def __init__(self):
        release = platform.release()
        self.base = Path("/lib/modules") / release
        builds = sorted(glob.glob("/usr/src/linux-headers-*-amd64") + glob.glob("/usr/src/linux-headers-*-arm64"))
        self.build = builds[-1] if builds else None
        self.source = None
        if self.build:
            common = re.sub(r"-(amd64|arm64)$", "-common", self.build)
            self.source = common if os.path.isdir(common) else self.build
        self.created = []
        self.note = None
        if not self.build:
            self.note = "no Debian kernel headers under /usr/src: stock bcc tools skipped"
        elif (self.base / "build").exists() or (self.base / "build").is_symlink():
            self.note = f"{self.base}/build already exists: used as it is, not removed"

    @property
    def usable(self):
        return self.build is not None or (self.base / "build").exists()

    def link(self):
        if self.created or not self.build or (self.base / "build").exists() or (self.base / "build").is_symlink():
            return
        if not self.base.exists():
            self.base.mkdir(parents=True)
            self.created.append(self.base)
        for name, target in (("build", self.build), ("source", self.source)):
            path = self.base / name
            if not path.exists() and not path.is_symlink():
                os.symlink(target, path)
                self.created.append(path)

    def unlink(self):
        for path in reversed(self.created):
            try:
                if path.is_symlink():
                    path.unlink()
                else:
                    path.rmdir()
            except OSError as e:
                say(f"could not remove {path}: {e}")
        self.created = []


# -- rows ----------------------------------------------------------------------


class RowParser:
    """Finds the local and remote port in a tool's table rows by the
    positions of LPORT and RPORT in its header line. A task name with spaces
    (the COMM column) shifts the columns after it; rows are matched from both
    ends around it."""

    def __init__(self):
        self.n = None

    def header(self, tokens):
        if b"LPORT" not in tokens or b"RPORT" not in tokens:
            return False
        self.n = len(tokens)
        self.il = tokens.index(b"LPORT")
        self.ir = tokens.index(b"RPORT")
        comm = [i for i, t in enumerate(tokens) if b"COMM" in t]
        self.comm = comm[0] if comm else -1
        return True

    def ports(self, line):
        """(lport, rport) as bytes, or None for a line that is not a row."""
        t = line.split()
        if self.n is None:
            self.header(t)
            return None
        k = len(t)
        if k == self.n:
            return t[self.il], t[self.ir]
        if k > self.n and self.comm >= 0:
            extra = k - self.n
            il = self.il + extra if self.il > self.comm else self.il
            ir = self.ir + extra if self.ir > self.comm else self.ir
            return t[il], t[ir]
        return None


def classify(lport, rport, portmap):
    """The load a row belongs to: its remote port is a server port (client
    side), or its local port is and it has a peer (server side; a listener's
    own rows have remote port 0)."""
    idx = portmap.get(rport)
    if idx is not None:
        return idx
    idx = portmap.get(lport)
    if idx is not None and rport != b"0":
        return idx
    return None


def count_rows(path, portmap, nloads):
    """Rows per load, other rows, losses reported on stdout per load (as
    bpftrace does: each is put on the load whose rows came last), and
    whether a header was found."""
    parser = RowParser()
    counts = [0] * nloads
    lost = [0] * nloads
    other = 0
    current = None
    unplaced = 0
    with open(path, "rb") as f:
        for line in f:
            if line.startswith((b"Lost ", b"Possibly lost ")):
                m = LOST_LINE.search(line)
                if m:
                    if current is None:
                        unplaced += int(m.group(1))
                    else:
                        lost[current] += int(m.group(1))
                continue
            ports = parser.ports(line)
            if ports is None:
                continue
            idx = classify(ports[0], ports[1], portmap)
            if idx is None:
                other += 1
            else:
                counts[idx] += 1
                if current is None:
                    lost[idx] += unplaced
                current = idx
    return counts, other, lost, parser.n is not None


def socket_paths(path, portmap, nloads):
    """For a tcpstates-like output (SKADDR, OLDSTATE, NEWSTATE columns):
    per load, how many socket lifetimes took each path through the states.
    A lifetime is a socket address's rows up to a change to CLOSE (the
    kernel reuses the address after that); a path is its states in order.
    A load that is rows short without a loss to show for it then tells
    whether sockets took a shorter path or rows went missing (a path with
    a gap: a state changed from that it never changed to)."""
    parser = RowParser()
    paths = [collections.Counter() for _ in range(nloads)]
    open_paths = {}
    cols = None
    with open(path, "rb") as f:
        for line in f:
            ports = parser.ports(line)
            if ports is None:
                if cols is None and parser.n is not None:
                    t = line.split()
                    if all(h in t for h in (b"SKADDR", b"OLDSTATE", b"NEWSTATE")):
                        cols = (t.index(b"SKADDR"), t.index(b"OLDSTATE") - parser.n,
                                t.index(b"NEWSTATE") - parser.n)
                continue
            if cols is None:
                return None
            idx = classify(ports[0], ports[1], portmap)
            if idx is None:
                continue
            t = line.split()
            sk, old, new = t[cols[0]], t[cols[1]].decode(), t[cols[2]].decode()
            key = (idx, sk)
            states = open_paths.setdefault(key, [old])
            if states[-1] != old:
                states.append("?")  # a row that should be there is not
                states.append(old)
            states.append(new)
            if new == "CLOSE":
                paths[idx][">".join(states)] += 1
                del open_paths[key]
    for (idx, _), states in open_paths.items():
        paths[idx][">".join(states) + " (not closed)"] += 1
    return paths


def keep_rows(path, portmap, idx, workdir, what):
    """The raw lines of load idx, and every line that is not a row at all
    (a task name the parser cannot place, garbage), into a file of their
    own in workdir: what a load that does not add up is checked against.
    Returns the file's name."""
    parser = RowParser()
    fd, name = tempfile.mkstemp(prefix=f"unaccounted-{what.replace('/', '-')}-", suffix=".txt", dir=workdir)
    with open(path, "rb") as f, os.fdopen(fd, "wb") as out:
        for line in f:
            ports = parser.ports(line)
            if ports is None or classify(ports[0], ports[1], portmap) == idx:
                out.write(line)
    return os.path.basename(name)


def keep_stderr(path, workdir, what):
    """A copy of a tracer's stderr beside the rows keep_rows() keeps; its name."""
    fd, name = tempfile.mkstemp(prefix=f"unaccounted-{what}-stderr-", suffix=".txt", dir=workdir)
    with open(path, "rb") as f, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(f, out)
    return os.path.basename(name)


LOST_TCPTRACE = (re.compile(r"(\d+) in all\)"), re.compile(r"(\d+) events lost in all"))
LOST_GENERIC = re.compile(r"[Ll]ost (\d+) (?:events|samples)")
LOST_LINE = re.compile(rb"[Ll]ost (\d+) (?:events|samples)")


def lost_so_far(text, style):
    if style == "tcptrace":
        found = [int(m) for rx in LOST_TCPTRACE for m in rx.findall(text)]
        return max(found, default=0)
    return sum(int(m) for m in LOST_GENERIC.findall(text))


# -- the probe: one loopback connection every 20 ms -----------------------------


class Probe:
    def __init__(self, port):
        self.port = port
        self.stop = threading.Event()
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(64)
        self.srv.settimeout(0.2)
        self.threads = [threading.Thread(target=self._serve, daemon=True),
                        threading.Thread(target=self._connect, daemon=True)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(2)
        self.srv.close()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except (socket.timeout, OSError):
                continue
            try:
                conn.settimeout(1)
                conn.recv(16)
            except OSError:
                pass
            conn.close()

    def _connect(self):
        while not self.stop.wait(0.02):
            try:
                c = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                c.sendall(b"p")
                c.close()
            except OSError:
                pass


# -- running a tracer ----------------------------------------------------------


def stop_process(proc, grace=30):
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def measure_startup(tracer, probe_port, headers, workdir, timeout=60):
    """Seconds from process start to the first row for the probe, with
    stdout on a pseudo-terminal; and the peak RSS meanwhile."""
    master, slave = os.openpty()
    err = open(os.path.join(workdir, f"{tracer.name}-startup.err"), "wb")
    if tracer.needs_headers:
        headers.link()
    parser = RowParser()
    port = str(probe_port).encode()
    result = {"startup": None, "rss_kib": 0, "error": None}
    proc = None
    try:
        with Probe(probe_port):
            t0 = time.monotonic()
            proc = subprocess.Popen(tracer.argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=err,
                                    start_new_session=True, env=tracer_env(), cwd=workdir)
            os.close(slave)
            slave = None
            pending = b""
            while result["startup"] is None:
                if time.monotonic() - t0 > timeout:
                    result["error"] = f"no probe row within {timeout} s"
                    break
                ready, _, _ = select.select([master], [], [], 0.02)
                if ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        result["error"] = f"exited with status {proc.wait()} before its first row"
                        break
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        ports = parser.ports(line.replace(b"\r", b""))
                        if ports and port in ports:
                            result["startup"] = time.monotonic() - t0
                            break
                if headers.created and attached(proc.pid):
                    headers.unlink()
                if proc.poll() is not None and not ready:
                    result["error"] = f"exited with status {proc.returncode} before its first row"
                    break
            result["rss_kib"] = hwm_kib(proc.pid)
    finally:
        if proc is not None:
            # Keep reading so a tool blocked on a full terminal can exit.
            stopper = threading.Thread(target=stop_process, args=(proc,))
            stopper.start()
            while stopper.is_alive():
                r, _, _ = select.select([master], [], [], 0.1)
                if r:
                    try:
                        os.read(master, 65536)
                    except OSError:
                        stopper.join()
                        break
        headers.unlink()
        if slave is not None:
            os.close(slave)
        os.close(master)
        err.close()
    if result["error"]:
        with open(err.name, "rb") as f:
            tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
        result["error"] += (": " + " | ".join(tail)) if tail else ""
    return result


def run_load(python, load, port, pairs):
    """Run loadgen.py once; its JSON summary."""
    rate, seconds = load["rate"], load["seconds"]
    connections = load["connections"]
    if rate != "max":
        seconds = seconds * 2 + 1  # a paced load makes all its connections; a slow one shows in its rate
    cmd = [python, str(LOADGEN), "--pairs", str(pairs), "--rate", str(rate), "--seconds", str(seconds),
           "--connections", str(connections), "--port", str(port)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    try:
        summary = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        summary = {"error": (out.stderr or out.stdout).strip()[-300:]}
    return summary


class Ports:
    """Server ports for the loads: a fresh range for every load of a run,
    below the ephemeral range so no client port can be mistaken for one."""

    def __init__(self, base, limit=32000):
        self.next = base
        self.base = base
        self.limit = limit

    def take(self, count):
        if self.next + count > self.limit:
            self.next = self.base
        port = self.next
        self.next += count
        return port


def wait_drained(pid, since_end_s, quiet_s=0.5, cap_s=20.0):
    """Wait until the tracer has used no CPU to speak of for quiet_s and at
    least since_end_s have passed (tcptrace reports losses once a second)."""
    start = time.monotonic()
    last = cpu_seconds(pid)
    quiet_since = start
    while time.monotonic() - start < cap_s:
        time.sleep(SAMPLE_S)
        now = cpu_seconds(pid)
        if now - last > 0.02:
            quiet_since = time.monotonic()
        last = now
        if time.monotonic() - quiet_since >= quiet_s and time.monotonic() - start >= since_end_s:
            return True
    return False


def run_tracer(tracer, loads, ports, python, headers, workdir, keep):
    """One run of a tracer (or of none, for the baseline) through every load."""
    result = {"loads": [], "rss_kib": 0, "error": None, "other_rows": 0}
    out_path = os.path.join(workdir, f"{tracer.name}.out")
    err_path = os.path.join(workdir, f"{tracer.name}.err")
    proc = None
    if tracer.argv:
        if tracer.needs_headers:
            headers.link()
        out = open(out_path, "wb")
        err = open(err_path, "wb")
        proc = subprocess.Popen(tracer.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, env=tracer_env(), cwd=workdir)
        out.close()
        err.close()
        t0 = time.monotonic()
        while not attached(proc.pid):
            if proc.poll() is not None or time.monotonic() - t0 > 90:
                headers.unlink()
                stop_process(proc)
                with open(err_path, "rb") as f:
                    tail = " | ".join(f.read().decode(errors="replace").strip().splitlines()[-3:])
                result["error"] = f"did not attach ({tail})"
                return result
            time.sleep(0.05)
        headers.unlink()
        time.sleep(1.0)  # from attach to its poll loop
    portmap = {}
    try:
        for i, load in enumerate(loads):
            port = ports.take(load["pairs"])
            for p in range(port, port + load["pairs"]):
                portmap[str(p).encode()] = i
            cpu0 = cpu_seconds(proc.pid) if proc else 0.0
            busy0, (self0, kids0), wall0 = machine_busy(), own_and_children(), time.monotonic()
            summary = run_load(python, load, port, load["pairs"])
            self1, kids1 = own_and_children()
            if "error" in summary:
                say(f"{tracer.name}: load {load['key']} failed: {summary['error']}")
            entry = {"key": load["key"], "load": summary}
            if proc:
                entry["drained"] = wait_drained(proc.pid, 1.2 if tracer.lost_style == "tcptrace" else 0.3)
                entry["cpu_s"] = cpu_seconds(proc.pid) - cpu0
                with open(err_path, "rb") as f:
                    entry["lost_total"] = lost_so_far(f.read().decode(errors="replace"), tracer.lost_style)
                result["rss_kib"] = max(result["rss_kib"], hwm_kib(proc.pid))
                if proc.poll() is not None:
                    result["error"] = f"exited with status {proc.returncode} during the loads"
                    break
            else:
                time.sleep(0.3)
            # What other processes used meanwhile: the noise of this load.
            tracer_cpu = entry.get("cpu_s", 0.0)
            wall = time.monotonic() - wall0
            others = machine_busy() - busy0 - tracer_cpu - (kids1 - kids0) - (self1 - self0)
            entry["load_cpu_s"] = kids1 - kids0
            entry["other_cpu_pct"] = max(0.0, 100.0 * others / (wall * (os.cpu_count() or 1)))
            result["loads"].append(entry)
    finally:
        if proc:
            result["rss_kib"] = max(result["rss_kib"], hwm_kib(proc.pid))
            result["status"] = stop_process(proc)
            headers.unlink()
    if not proc:
        return result
    with open(err_path, "rb") as f:
        errtext = f.read().decode(errors="replace")
    result["lost_final"] = lost_so_far(errtext, tracer.lost_style)
    result["stderr_tail"] = errtext.strip().splitlines()[-3:]
    counts, other, stdout_lost, found_header = count_rows(out_path, portmap, len(loads))
    if not found_header:
        result["error"] = "no header line with LPORT and RPORT in its output"
    result["other_rows"] = other
    previous_lost = 0
    for entry, rows, more_lost in zip(result["loads"], counts, stdout_lost):
        entry["rows"] = rows
        load = entry["load"]
        if tracer.rows_per_connection and "connections" in load:
            entry["expected"] = load["connections"] * tracer.rows_per_connection
        entry["lost"] = entry.get("lost_total", 0) - previous_lost + more_lost
        previous_lost = entry.get("lost_total", 0)
    # tcptrace's own shortfalls (the other tools' losses are placed on loads only roughly):
    # the load's rows and the tracer's whole stderr (its loss reports) are kept to check it by.
    if tracer.lost_style == "tcptrace" and not all(map(accounted, result["loads"])):
        paths = socket_paths(out_path, portmap, len(loads)) if tracer.kind == "states" else None
        err_kept = keep_stderr(err_path, workdir, tracer.name)
        for i, entry in enumerate(result["loads"]):
            if accounted(entry):
                continue
            if paths is not None:
                entry["paths"] = paths[i].most_common(12)
            entry["raw"] = keep_rows(out_path, portmap, i, workdir, f"{tracer.name}-{entry['key']}")
            entry["raw_err"] = err_kept
    if not keep:
        for path in (out_path, err_path):
            try:
                os.unlink(path)
            except OSError:
                pass
    return result


# -- the plan ------------------------------------------------------------------


def build_loads(rates, pairs, paced_s, max_s, max_connections):
    loads = []
    for rate in rates:
        for n in pairs:
            if rate == "max":
                loads.append({"key": f"max/{n}", "rate": "max", "pairs": n, "seconds": max_s,
                              "connections": max_connections})
            else:
                loads.append({"key": f"{int(rate)}/{n}", "rate": rate, "pairs": n, "seconds": paced_s,
                              "connections": int(rate * paced_s)})
    return loads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark tcptrace against bcc's tools and bpftrace (root).")
    p.add_argument("--tool", action="append", default=None, metavar="NAME",
                   help="a tcptrace tool to measure (repeat; default: states, and life when tcptrace has it)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=COMMAND",
                   help="also run another tcptrace build, e.g. a patched copy: "
                        "'patched=env PYTHONPATH=/tmp/copy .venv/bin/python -m tcptrace' (repeat)")
    p.add_argument("--others", default="tcpstates,tcplife,bpftrace",
                   help="tools to compare with, comma-separated, from tcpstates,tcplife,bpftrace; 'none' for none")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--rates", default="2000,8000,max", help="paced rates in conn/s and/or max (default 2000,8000,max)")
    p.add_argument("--pairs", default="2,4,8", help="client/server process pairs (default 2,4,8)")
    p.add_argument("--seconds", type=float, default=1.5, help="length of a paced load (default 1.5 s)")
    p.add_argument("--max-seconds", type=float, default=2.0, help="length of a max-rate load (default 2 s)")
    p.add_argument("--max-connections", type=int, default=200000, help="cap of a max-rate load")
    p.add_argument("--quick", action="store_true",
                   help="development: 1 repetition, 8000/s and max with 2 pairs, 1 s loads")
    p.add_argument("--no-install", action="store_true", help="do not install the comparison tools")
    p.add_argument("--port-base", type=int, default=20000, help="first server port of the loads")
    p.add_argument("--probe-port", type=int, default=19999, help="port of the start-up probe")
    p.add_argument("--keep", action="store_true", help="keep the tracers' raw output (in the work directory)")
    p.add_argument("--out", default=str(RESULTS), help="where the report goes (default bench/results)")
    p.add_argument("--render", metavar="JSON", help="print the report of a saved run (bench/results/*.json) and exit")
    p.add_argument("--page", metavar="DIR",
                   help="write docs/performance.md from one run's directory (this script's report and the "
                        "--json files of probe.py, top_load.py, drops_load.py in it) and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
        args.rates = "8000,max"
        args.pairs = "2"
        args.seconds = 1.0
        args.max_seconds = 1.0
    args.rates = [r.strip() if r.strip() == "max" else float(r) for r in args.rates.split(",") if r.strip()]
    args.pairs = [int(x) for x in args.pairs.split(",") if x.strip()]
    args.others = [] if args.others.strip() == "none" else [o.strip() for o in args.others.split(",")]
    variants = []
    for v in args.variant:
        label, _, command = v.partition("=")
        if not label or not command or not re.fullmatch(r"[\w.-]+", label):
            p.error(f"--variant wants LABEL=COMMAND, got {v!r}")
        variants.append((label, shlex.split(command)))
    args.variant = variants
    if args.reps < 1 or not args.rates or not args.pairs:
        p.error("need at least one repetition, rate and pair count")
    return args


def ensure_environment(args):
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (the tracers load BPF programs): sudo make bench")
    if not args.no_install and args.others:
        env = dict(os.environ, PACKAGES=packages())
        rc = subprocess.run(["sh", str(ROOT / "scripts" / "apt-ensure.sh")], env=env).returncode
        if rc != 0:
            say("could not install the comparison tools; going on with what is there")
    if not os.path.isdir("/sys/kernel/tracing/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=False)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # through the finally blocks: tracers stopped, header links removed


def rerender(path):
    """The report of a saved run (its .json), with this version's tables."""
    with open(path) as f:
        saved = json.load(f)
    order = []
    for name, t in saved["tracers"].items():
        style = t.get("lost_style") or ("tcptrace" if name.startswith("tcptrace") else "generic")
        order.append(Tracer(name, t["argv"], t["kind"], t.get("needs_headers", False), style, t["label"]))
    return render(saved["info"], order, saved["loads"], saved["results"])


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        sys.stdout.write(rerender(args.render))
        return 0
    if args.page:
        return write_page(args.page)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    ensure_environment(args)
    registered = tcptrace_tools()
    tools = args.tool or (["states"] + (["life"] if "life" in registered else []))
    tracers = []
    for tool in tools:
        if tool not in registered:
            raise SystemExit(f"bench: tcptrace has no tool {tool!r} (it has: {', '.join(registered)})")
        kind = tool if tool in ROWS_PER_CONNECTION else None
        tracers.append(Tracer(f"tcptrace-{tool}", tcptrace_command() + [tool], kind, lost_style="tcptrace",
                              label=f"tcptrace {tool}"))
        for label, command in args.variant:
            tracers.append(Tracer(f"tcptrace-{tool}-{label}", command + [tool], kind, lost_style="tcptrace",
                                  label=f"tcptrace {tool} ({label})"))
    headers = StockHeaders()
    others = stock_tracers(args.others)
    if not headers.usable:
        others = [t for t in others if not t.needs_headers]
    tracers += others
    loads = build_loads(args.rates, args.pairs, args.seconds, args.max_seconds, args.max_connections)
    order = [BASELINE] + tracers
    python = sys.executable
    started = datetime.datetime.now()
    info = {"date": started.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "versions": versions(),
            "settings": {"reps": args.reps, "loads": [l["key"] for l in loads], "paced_s": args.seconds,
                         "max_s": args.max_seconds, "quick": args.quick},
            "kept_as": shown_path(os.path.join(args.out, started.strftime("%Y-%m-%d_%H%M%S-"))),
            "notes": [n for n in [headers.note] if n] + [
                "losses of the other tools are put on the load during whose window (stderr) or after whose "
                "rows (stdout, bpftrace) they were reported: per load, approximate"]}
    say(f"{len(order)} runs x {len(loads)} loads x {args.reps} repetitions: "
        + ", ".join(t.label for t in order))
    results = {t.name: [] for t in order}
    ports = Ports(args.port_base)
    workdir = tempfile.mkdtemp(prefix="tcptrace-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        for rep in range(args.reps):
            k = rep % len(order)
            for tracer in order[k:] + order[:k]:
                t0 = time.monotonic()
                entry = {}
                if tracer.argv:
                    entry["startup"] = measure_startup(tracer, args.probe_port, headers, workdir)
                entry.update(run_tracer(tracer, loads, ports, python, headers, workdir, args.keep))
                results[tracer.name].append(entry)
                su = entry.get("startup", {}).get("startup")
                say(f"rep {rep + 1}/{args.reps} {tracer.label}: {time.monotonic() - t0:.0f} s"
                    + (f", start-up {su:.2f} s" if su else "")
                    + (f", error: {entry['error']}" if entry.get("error") else "")
                    + (f", start-up error: {entry['startup']['error']}" if entry.get("startup", {}).get("error") else ""))
    finally:
        headers.unlink()
        os.makedirs(args.out, exist_ok=True)
        for name in glob.glob(os.path.join(workdir, "unaccounted-*")):  # a load that did not add up: keep its rows
            shutil.move(name, os.path.join(args.out, started.strftime("%Y-%m-%d_%H%M%S-") + os.path.basename(name)))
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"raw output kept in {workdir}")
    info["elapsed_s"] = round((datetime.datetime.now() - started).total_seconds())
    report = render(info, order, loads, results)
    sys.stdout.write(report)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, started.strftime("%Y-%m-%d_%H%M%S"))
    with open(stem + ".md", "w") as f:
        f.write(report)
    with open(stem + ".json", "w") as f:
        json.dump({"info": info, "loads": loads, "results": results,
                   "tracers": {t.name: {"label": t.label, "kind": t.kind, "argv": t.argv,
                                        "needs_headers": t.needs_headers, "lost_style": t.lost_style}
                               for t in order}},
                  f, indent=1, default=str)
    say(f"report written to {stem}.md (raw numbers in {stem}.json); "
        f"bench/run.py --page {shown_path(args.out)} puts it into {shown_path(PERFORMANCE_PAGE)}")
    return 0


def shown_path(path):
    """A path as the report names it: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# -- the report ----------------------------------------------------------------


def docs_section(report, depth=2):
    """The report as the body of a page's section: its headings moved
    `depth` levels down, below the page's own."""
    return "\n".join("#" * depth + line if line.startswith("#") else line
                     for line in report.strip("\n").split("\n"))


def update_docs(report, page=PERFORMANCE_PAGE, name=PERFORMANCE_SECTION):
    """Put the report into the page's generated section; the hand-written
    rest of the page is kept. True when the page changed."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gendocs

    return gendocs.write_section(page, name, docs_section(report))


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values, fmt):
    """'median (min-max)' of the repetitions."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(min(values))}-{fmt(max(values))})"


def load_stat(results, name, key, what):
    """One number per repetition for one tracer and load."""
    out = []
    for rep in results[name]:
        for entry in rep.get("loads", []):
            if entry["key"] != key:
                continue
            load = entry["load"]
            if what == "complete":
                if entry.get("expected"):
                    out.append(100.0 * entry["rows"] / entry["expected"])
            elif what == "rate":
                out.append(load.get("rate"))
            elif what == "cpu_us":
                if entry.get("rows"):
                    out.append(1e6 * entry["cpu_s"] / entry["rows"])
            elif what == "lost":
                out.append(entry.get("lost", 0))
            elif what == "other":
                out.append(entry.get("other_cpu_pct"))
            elif what == "accounted":
                if entry.get("expected") is not None:
                    out.append(accounted(entry))
    return out


def accounted(entry):
    """Every row short of the expected count has a reported loss, and no
    row is extra."""
    if entry.get("expected") is None or "rows" not in entry:
        return True
    missing = entry["expected"] - entry["rows"]
    return missing <= entry.get("lost", 0) and entry["rows"] <= entry["expected"]


def overall_cpu_us(results, name):
    """Per repetition: tracer CPU over all loads / rows over all loads."""
    out = []
    for rep in results[name]:
        cpu = sum(e.get("cpu_s", 0) for e in rep.get("loads", []))
        rows = sum(e.get("rows", 0) for e in rep.get("loads", []))
        if rows:
            out.append(1e6 * cpu / rows)
    return out


def pct(v):
    return f"{v:.1f} %" if v < 99.95 or v > 100.0 else f"{v:.2f} %" if v < 100.0 else "100 %"


def render(info, order, loads, results):
    m = info["machine"]
    v = info["versions"]
    tracers = [t for t in order if t.argv]
    lines = [
        f"# tcptrace benchmark, {info['date']}",
        "",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_mib']} MiB memory, kernel {m['kernel']}",
        f"- tcptrace {v.get('tcptrace')}, bcc {v.get('python3-bpfcc')}, bpftrace {v.get('bpftrace')}",
        f"- {info['settings']['reps']} repetitions, interleaved with a no-tracer baseline; loads "
        f"(rate conn/s / client-server pairs): {', '.join(info['settings']['loads'])}; paced loads "
        f"{info['settings']['paced_s']} s, max-rate loads {info['settings']['max_s']} s; "
        f"{info.get('elapsed_s', '?')} s in all",
        "- values are medians over the repetitions, (min-max) when they differ",
        "- tracer CPU is the scheduler's run time of the tracer's threads (what utime+stime count, without "
        "10 ms tick sampling), over the load and until the tracer has drained its buffer",
        "- stock bcc tools ran on Debian's 6.1 headers (linked only while they started): "
        "tcplife's TX_KB/RX_KB are unreliable then (wrong struct offsets); rows are still counted",
        "- the bpftrace one-liner prints pid, comm, IPv4 addresses, ports and numeric states",
    ]
    lines.append("- tracers ran without " + ", ".join(SCRUBBED_ENV) + " from the calling environment")
    lines += [f"- {n}" for n in info.get("notes", [])]
    lines.append("")

    # Summary: one line per tool.
    keys = [l["key"] for l in loads]
    headline = [k for k in ("8000/2", "max/2", "max/4", "max/8") if k in keys]
    lines += ["## Summary", ""]
    head = ["tool", "start-up to first event", "peak RSS"] + [f"complete at {k}" for k in headline] + [
        "tracer CPU per row (= ms per 1000 rows)", "losses reported"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for t in tracers:
        reps = results[t.name]
        su = [r.get("startup", {}).get("startup") for r in reps]
        rss = [max(r.get("rss_kib", 0), r.get("startup", {}).get("rss_kib", 0)) / 1024 or None for r in reps]
        row = [t.label, spread(su, lambda x: f"{x:.2f} s"), spread(rss, lambda x: f"{x:.0f} MiB")]
        for k in headline:
            row.append(spread(load_stat(results, t.name, k, "complete"), pct))
        row.append(spread(overall_cpu_us(results, t.name), lambda x: f"{x:.1f} us"))
        lost = sum(e.get("lost", 0) for r in reps for e in r.get("loads", []))
        if t.lost_style == "tcptrace":
            acc = [a for l in keys for a in load_stat(results, t.name, l, "accounted")]
            row.append(f"{lost}; {'all missing rows reported' if all(acc) else 'NOT all missing rows reported'}")
        else:
            row.append(str(lost))
        lines.append("| " + " | ".join(row) + " |")
    errors = [(t.label, i + 1, r.get("error") or r.get("startup", {}).get("error"))
              for t in tracers for i, r in enumerate(results[t.name])
              if r.get("error") or r.get("startup", {}).get("error")]
    for label, rep, err in errors:
        lines.append(f"\n- {label}, repetition {rep}: {err}")
    lines.append("")

    # Completeness per load.
    lines += ["## Completeness per load (rows seen / expected; lost = losses the tool reported)", ""]
    head = ["load", "conn/s without tracer"] + [t.label for t in tracers]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for k in keys:
        row = [k, spread(load_stat(results, "none", k, "rate"), lambda x: f"{x:.0f}")]
        for t in tracers:
            c = load_stat(results, t.name, k, "complete")
            lost = load_stat(results, t.name, k, "lost")
            cell = spread(c, pct)
            if any(lost):
                cell += f", lost {int(median(lost))}"
            if t.lost_style == "tcptrace":
                acc = load_stat(results, t.name, k, "accounted")
                if acc and not all(acc):
                    cell += " UNACCOUNTED"
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    # Load slowdown.
    lines += ["## Load rate achieved (conn/s) and slowdown against no tracer", ""]
    head = ["load", "no tracer"] + [t.label for t in tracers]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for k in keys:
        base = median(load_stat(results, "none", k, "rate"))
        row = [k, f"{base:.0f}" if base else "-"]
        for t in tracers:
            r = median(load_stat(results, t.name, k, "rate"))
            if r and base:
                row.append(f"{r:.0f} (x{base / r:.2f})")
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    # CPU per row.
    lines += ["## Tracer CPU per row (run time of the tracer during a load and its drain / rows of the load)", ""]
    head = ["load"] + [t.label for t in tracers]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for k in keys:
        row = [k] + [spread(load_stat(results, t.name, k, "cpu_us"), lambda x: f"{x:.1f} us") for t in tracers]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += ["## Noise: other processes' CPU during each load (% of the machine)", "",
              "Busy user+system time of the machine minus the tracer, the load generator and this harness; "
              "other engineers' test runs show up here.", ""]
    head = ["load"] + [t.label for t in order]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for k in keys:
        row = [k] + [spread(load_stat(results, t.name, k, "other"), lambda x: f"{x:.0f} %") for t in order]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    noise = {t.label: [r.get("other_rows", 0) for r in results[t.name]] for t in tracers}
    lines.append("Rows for other traffic during the runs (noise from other processes, and the tools' own): "
                 + "; ".join(f"{k}: {'/'.join(str(x) for x in v)}" for k, v in noise.items()))
    lines.append("")

    lines += unaccounted(tracers, results, info.get("kept_as"))
    lines += targets(tracers, results, keys)
    return "\n".join(lines) + "\n"


def unaccounted(tracers, results, kept_as=None):
    """Every load whose missing rows were not all reported lost: where its
    raw output was kept (kept_as: the prefix of those files' paths) and, for
    tcpstates-like output, its socket paths (see socket_paths)."""
    out = []
    for t in tracers:
        for rep, r in enumerate(results[t.name]):
            for e in r.get("loads", []):
                if "paths" not in e and "raw" not in e:
                    continue
                if e.get("raw") and kept_as:
                    kept = f" (its rows: `{kept_as}{e['raw']}`"
                    kept += f", the tracer's stderr: `{kept_as}{e['raw_err']}`)" if e.get("raw_err") else ")"
                elif e.get("raw"):
                    kept = f" (its rows beside this report: <date>-{e['raw']})"
                else:
                    kept = ""
                out.append(f"- {t.label}, repetition {rep + 1}, load {e['key']}: {e['rows']} rows of "
                           f"{e['expected']}, {e.get('lost', 0)} reported lost{kept}"
                           + ("; socket lifetimes by path:" if e.get("paths") else ""))
                out += [f"  - {n} x {p}" for p, n in e.get("paths", [])]
    if out:
        out = ["## Loads that do not add up", "",
               "Rows short of what the load made with fewer losses reported; the sockets' paths through the "
               "states tell a shorter path from a missing row ('?').", ""] + out + [""]
    return out


def targets(tracers, results, keys):
    """The issue's targets for each tcptrace tool, against this run."""
    out = ["## Targets", "", "| tool | target | measured | met |", "|---|---|---|---|"]
    by_name = {t.name: t for t in tracers}
    for t in tracers:
        if t.lost_style != "tcptrace":
            continue
        twin = by_name.get(BCC_TWIN.get(t.kind, ""))
        reps = results[t.name]

        def add(target, measured, ok):
            out.append(f"| {t.label} | {target} | {measured} | {'yes' if ok else 'NO' if ok is not None else '-'} |")

        su = median([r.get("startup", {}).get("startup") for r in reps])
        add("start-up <= 0.6 s (median)", f"{su:.2f} s" if su else "-", su is not None and su <= 0.6)
        rss = median([max(r.get("rss_kib", 0), r.get("startup", {}).get("rss_kib", 0)) for r in reps])
        if twin:
            trss = median([max(r.get("rss_kib", 0), r.get("startup", {}).get("rss_kib", 0))
                           for r in results[twin.name]])
            ok = bool(rss and trss) and rss <= 0.6 * trss
            add(f"peak RSS <= 0.6 x {twin.label}", f"{rss / 1024:.0f} MiB = {rss / trss:.2f} x" if trss else "-",
                ok if trss else None)
        for k in keys:
            if k.startswith("8000/") or k == "max/2":
                c = median(load_stat(results, t.name, k, "complete"))
                add(f">= 99.9 % at {k}", pct(c) if c is not None else "-", c is not None and c >= 99.9)
        for k in keys:
            if k.startswith("max/") and k != "max/2":
                c = median(load_stat(results, t.name, k, "complete"))
                best = [(median(load_stat(results, o.name, k, "complete")), o.label)
                        for o in tracers if o.lost_style != "tcptrace" and o.kind == t.kind]
                best = [b for b in best if b[0] is not None]
                if best and c is not None:
                    b = max(best)
                    add(f"at {k} as complete as the best other tool", f"{pct(c)} vs {pct(b[0])} ({b[1]})",
                        c >= b[0])
        acc = [a for k in keys for a in load_stat(results, t.name, k, "accounted")]
        add("every loss counted and reported", f"{sum(acc)}/{len(acc)} loads add up", bool(acc) and all(acc))
        cpu = median(overall_cpu_us(results, t.name))
        if twin:
            bcpu = median(overall_cpu_us(results, twin.name))
            if cpu and bcpu:
                add(f"CPU per event <= 0.5 x {twin.label}", f"{cpu:.1f} us = {cpu / bcpu:.2f} x", cpu <= 0.5 * bcpu)
    out.append("")
    return out



# -- the page: the state-change run, and the loads of probe, top and drops -------
#
# probe.py, top_load.py and drops_load.py each write one record (--json) of
# the shape load_record() gives: every tracer's rounds, round i of each
# tracer in the same repetition (so a ratio is taken within a repetition),
# with the load's rate as "value" (higher is better). write_page() puts
# this script's report and theirs, from one run's directory, into the page
# in one write: a run that stopped half-way leaves the page as it was.

TOOLS_SECTION = "bench-tools"
LOAD_BENCHES = ("probe", "top", "drops")  # <name>.json in a run's directory


def three(values):
    """{median, min, max, n} of the values that are there, or None."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def load_record(bench, title, unit, fmt, tracers, columns=(), settings=None, missing_anchors=(),
                scale=1.0, packages=()):
    """A load script's results, as it writes them with --json.

    tracers: [{"label", "role": baseline|tcptrace|anchor, "rounds": [{"value", <column keys>...}]}];
    columns: [{"key", "label", "fmt", "agg": median|spread|sum}], per-round numbers of the
    load's own table; missing_anchors: one sentence per anchor that could not run here."""
    record = {"bench": bench, "title": title, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "versions": versions(packages), "settings": settings or {},
              "unit": unit, "scale": scale, "fmt": fmt, "columns": list(columns), "tracers": tracers,
              "missing_anchors": list(missing_anchors)}
    return add_stats(record)


def add_stats(record):
    """Each tracer's medians and spreads (value, ratio to no tracer, slowdown,
    its columns), for readers of the JSON; the page is drawn from the rounds."""
    base = baseline_values(record)
    for t in record["tracers"]:
        values = [r["value"] for r in t["rounds"]]
        t["stats"] = {"value": three(values),
                      "ratio_to_none": three([v / b if v is not None and b else None for v, b in zip(values, base)]),
                      "slowdown": three(slowdowns(record, t))}
        for c in record["columns"]:
            t["stats"][c["key"]] = three([r.get(c["key"]) for r in t["rounds"]])
    return record


def write_json(path, record):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    say(f"results written to {path}")


def baseline_values(record):
    base = next((t for t in record["tracers"] if t["role"] == "baseline"), None)
    return [r["value"] for r in base["rounds"]] if base else []


def slowdowns(record, tracer):
    """Per round: the load's rate without a tracer / with this one."""
    return [b / r["value"] if r["value"] and b else None for r, b in zip(tracer["rounds"], baseline_values(record))]


def paired(values, others, op):
    return [op(a, b) if a is not None and b else None for a, b in zip(values, others)]


def choose_anchor(values_by_anchor):
    """The anchor with the lowest median cost: the one to beat."""
    measured = {name: median(v) for name, v in values_by_anchor.items() if median(v) is not None}
    return min(measured, key=lambda name: (measured[name], name)) if measured else None


def per_rep_cpu_us(results, name):
    """Per repetition: tracer CPU over all loads / rows over all loads (None
    for a repetition without rows)."""
    out = []
    for rep in results.get(name, []):
        cpu = sum(e.get("cpu_s", 0) for e in rep.get("loads", []))
        rows = sum(e.get("rows", 0) for e in rep.get("loads", []))
        out.append(1e6 * cpu / rows if rows else None)
    return out


def state_summary(saved):
    """Summary rows of the state-change tools of a saved run.py run: CPU per
    row against the cheapest bcc or bpftrace tool with the same rows."""
    tracers, results = saved["tracers"], saved["results"]
    style = {n: t.get("lost_style") or ("tcptrace" if n.startswith("tcptrace") else "generic")
             for n, t in tracers.items()}
    keys = saved["info"]["settings"]["loads"]
    load = f"loopback connections (bench/loadgen.py): {', '.join(keys)}"
    rows = []
    for name, t in tracers.items():
        if style[name] != "tcptrace":
            continue
        mine = per_rep_cpu_us(results, name)
        others = [n for n, o in tracers.items() if o.get("argv") and style[n] != "tcptrace"]
        anchors = [n for n in others if tracers[n].get("kind") == t.get("kind")]
        if not anchors and BCC_TWIN.get(t.get("kind")) in others:
            anchors = [BCC_TWIN[t["kind"]]]
        row = {"tool": t["label"], "load": load, "metric": "tracer CPU per row", "measured": three(mine),
               "unit": "us"}
        best = choose_anchor({n: per_rep_cpu_us(results, n) for n in anchors})
        if best:
            theirs = per_rep_cpu_us(results, best)
            row.update(anchor=tracers[best]["label"], anchor_value=three(theirs),
                       ratio=three(paired(mine, theirs, lambda a, b: a / b)))
        else:
            row.update(anchor=None, ratio=None,
                       no_anchor="; ".join(["no bcc or bpftrace tool ran in this run"] + [
                           n for n in saved["info"].get("notes", []) if "skipped" in n]))
        rows.append(row)
    return rows


def load_summary(record):
    """Summary rows of a load script's tcptrace tools: the load's slowdown
    against the anchor that slows it least, or against no tracer when no
    anchor runs here."""
    anchors = {t["label"]: slowdowns(record, t) for t in record["tracers"] if t["role"] == "anchor"}
    best = choose_anchor(anchors)
    rows = []
    for t in record["tracers"]:
        if t["role"] != "tcptrace":
            continue
        mine = slowdowns(record, t)
        row = {"tool": t["label"], "load": record["title"], "metric": "load slowdown (rate without a tracer / with)",
               "measured": three(mine), "unit": "x"}
        if best:
            row.update(anchor=best, anchor_value=three(anchors[best]),
                       ratio=three(paired(mine, anchors[best], lambda a, b: a / b)))
        else:
            row.update(anchor=None, ratio=three(mine),
                       no_anchor="; ".join(record.get("missing_anchors") or ["no anchor ran"]))
        rows.append(row)
    return rows


def fmt_three(stat, fmt):
    """'median (min-max)', as the rest of the report writes a spread."""
    if not stat:
        return "-"
    if stat["n"] == 1:
        return fmt(stat["median"])
    return f"{fmt(stat['median'])} ({fmt(stat['min'])}-{fmt(stat['max'])})"


UNIT_FORMATS = {"us": lambda x: f"{x:.1f} us", "x": lambda x: f"x{x:.2f}"}


def summary_table(rows, unmeasured=()):
    """The one table of every tcptrace tool against its best anchor."""
    lines = ["| tool | load | metric | measured, median (min-max) | best anchor in the same run | the anchor's | "
             "ratio to the anchor, median (min-max) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = UNIT_FORMATS[r["unit"]]
        ratio = fmt_three(r.get("ratio"), lambda x: f"{x:.2f}")
        if r.get("anchor"):
            anchor, theirs = r["anchor"], fmt_three(r.get("anchor_value"), unit)
        elif r.get("ratio"):
            anchor, theirs, ratio = f"none runs here ({r['no_anchor']})", "-", ratio + " to no tracer"
        else:
            anchor, theirs = f"none runs here ({r['no_anchor']})", "-"
        lines.append(f"| {r['tool']} | {r['load']} | {r['metric']} | {fmt_three(r['measured'], unit)} | "
                     f"{anchor} | {theirs} | {ratio} |")
    if unmeasured:
        lines += ["", "Not measured by the bench: " + ", ".join(f"tcptrace {t}" for t in unmeasured) + "."]
    return lines


def load_table(record):
    """A load script's own table, from its record."""
    scale, fmt = record.get("scale", 1.0), record["fmt"]
    value = lambda x: format(x / scale, fmt)  # noqa: E731
    columns = record.get("columns", [])
    base = baseline_values(record)
    head = ["tracer", f"{record['unit']}, median (min-max)", "ratio to no tracer, median (min-max)",
            "slowdown"] + [c["label"] for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in record["tracers"]:
        values = [r["value"] for r in t["rounds"]]
        row = [t["label"], fmt_three(three(values), value),
               fmt_three(three(paired(values, base, lambda a, b: a / b)), lambda x: f"{x:.3f}"),
               fmt_three(three(slowdowns(record, t)), UNIT_FORMATS["x"])]
        for c in columns:
            got = [r.get(c["key"]) for r in t["rounds"]]
            cf = lambda x, f=c["fmt"]: format(x, f)  # noqa: E731
            if not any(v is not None for v in got):
                row.append("-")
            elif c.get("agg") == "sum":
                row.append(cf(sum(v for v in got if v is not None)))
            elif c.get("agg") == "spread":
                row.append(fmt_three(three(got), cf))
            else:
                row.append(cf(median(got)) if median(got) is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def load_section(record):
    m, v = record["machine"], record["versions"]
    settings = ", ".join(f"{k} {val}" for k, val in record.get("settings", {}).items())
    lines = [f"## {record['bench']}: {record['title']}", "",
             f"- {record['date']}; {m['nproc']} CPUs, kernel {m['kernel']}; "
             + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- settings: {settings}" if settings else None,
             "- values are medians over the rounds, (min-max) when there are several; a ratio or slowdown "
             "is taken against no tracer in the same round"]
    lines += [f"- {note}" for note in record.get("notes", [])]
    lines += [f"- not run: {why}" for why in record.get("missing_anchors", [])]
    lines = [line for line in lines if line is not None] + [""] + load_table(record) + [""]
    return lines


def render_tools(saved, benches, registered=(), where=None):
    """The page's bench-tools section: the summary of every tool against its
    best anchor, then the loads of probe, top and drops (benches: {name:
    record}, the missing ones said to be missing)."""
    rows = state_summary(saved) if saved else []
    for name in LOAD_BENCHES:
        if name in benches:
            rows += load_summary(benches[name])
    measured = {r["tool"].split()[1] for r in rows if r["tool"].startswith("tcptrace ")}
    unmeasured = [t for t in registered if t not in measured]
    lines = ["# Every tool against its best anchor", "",
             "Each tcptrace tool under its load, its headline cost, and that cost against the cheapest other "
             "tracer of the same events in the same run (the anchor): tracer CPU per row for the state-change "
             "tools (rows of the same kind), the load's slowdown for the others. A ratio below 1 means "
             "tcptrace costs less than the anchor; it is the median of the ratios taken within each "
             "repetition, (min-max) over the repetitions.", ""]
    lines += summary_table(rows, unmeasured)
    lines.append("")
    for name in LOAD_BENCHES:
        if name in benches:
            lines += load_section(benches[name])
        else:
            lines += [f"## {name}", "", "Not run in this run.", ""]
    if where:
        lines += [f"Raw numbers of this run: `{where}/`.", ""]
    return "\n".join(lines)


def write_page(run_dir, page=PERFORMANCE_PAGE, registered=None):
    """Both generated sections of the page from one run's directory, in one
    write; a --quick state-change run leaves the page alone."""
    run_dir = Path(run_dir)
    reports = sorted(p for p in run_dir.glob("*.json") if p.stem not in LOAD_BENCHES)
    if not reports:
        raise SystemExit(f"bench: no report of bench/run.py in {run_dir}")
    with open(reports[-1]) as f:
        saved = json.load(f)
    if saved["info"]["settings"].get("quick"):
        say(f"{reports[-1].name} is a --quick run: {shown_path(page)} left as it was")
        return 0
    benches = {}
    for name in LOAD_BENCHES:
        path = run_dir / f"{name}.json"
        if path.exists():
            with open(path) as f:
                benches[name] = json.load(f)
    registered = tcptrace_tools() if registered is None else registered
    tools = render_tools(saved, benches, registered, shown_path(run_dir))
    (run_dir / "tools.md").write_text(tools)
    sys.path.insert(0, str(ROOT / "scripts"))
    import gendocs

    page = Path(page)
    text = page.read_text()
    try:
        new = gendocs.replace_section(text, PERFORMANCE_SECTION, docs_section(rerender(reports[-1])))
        new = gendocs.replace_section(new, TOOLS_SECTION, docs_section(tools))
    except gendocs.MarkerError as e:
        raise SystemExit(f"bench: {shown_path(page)} left as it was: {e}")
    if new != text:
        page.write_text(new)
    say(f"{shown_path(page)} {'rewritten' if new != text else 'unchanged'} from {shown_path(run_dir)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
