"""Running the real tool against real traffic, for the privileged tests."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "tests", "peer.py")
READY_TIMEOUT = 60
ENVELOPE = ("ts", "ts_mono", "host", "tool", "schema")  # output.ENVELOPE, spelled out so a change shows
ANNOUNCED = re.compile(r"^tcptrace [a-z]+: .*; Ctrl-C to end$")  # session.announce()
_RFC3339_MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def fixed_btf(struct_name, members, base=1600, size=8):
    """Made-up BTF offsets, for compiling a program against a saved kernel's
    formats: every member found, each at its own offset; the arguments of a
    tracepoint taken raw (btf_trace_<event>) where the kernel puts them, a
    u64 each in order, which the verifier checks."""
    from tcptrace import btf

    if struct_name in btf.PROTOTYPES:
        order = [name for name, _type in btf.PROTOTYPES[struct_name]]
        return {m: (8 * order.index(m), 8) for m in members}
    return {m: (base + 8 * i, size) for i, m in enumerate(sorted(members))}


def load_functions(bcc, program, spec, plan):
    """Load each function of the plan's tracepoints into the kernel (the
    verifier's verdict), raw ones as raw tracepoint programs."""
    for tp in spec.tracepoints:
        if tp.name in plan.formats:
            kind = bcc.BPF.RAW_TRACEPOINT if tp.name in plan.raw else bcc.BPF.TRACEPOINT
            program.load_func(tp.function.encode(), kind)


def must_run():
    """On this project's CI a privileged test may not skip: a skip there hides
    exactly the failures these tests exist for."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unwrap(obj, tool=None):
    """An object of the JSON output without its envelope, once the envelope
    is checked: it comes first, in order, with this host and schema 1."""
    keys = [k for k in ENVELOPE if k in obj]
    assert list(obj)[: len(keys)] == keys and set(ENVELOPE) - {"tool"} <= set(keys), obj
    assert _RFC3339_MICRO.match(obj["ts"]) and isinstance(obj["ts_mono"], (int, float)), obj
    assert obj["host"] == socket.gethostname() and obj["schema"] == 1, obj
    if tool is not None:
        assert obj["tool"] == tool, obj
    return {k: v for k, v in obj.items() if k not in ENVELOPE}


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    """A port nothing listens on now (bound and released)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcptrace_cmd(*args):
    return [sys.executable, "-m", "tcptrace", *args]


def read_until(stream, done, what, timeout=READY_TIMEOUT):
    """Lines of a process's text `stream`, read until done(lines) holds;
    fails naming `what` if the stream ends or `timeout` passes first.
    The rest stays in the stream (communicate() reads it later)."""
    lines = []
    finished = threading.Event()

    def read():
        for line in stream:
            lines.append(line)
            if done(lines):
                finished.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not finished.wait(timeout):
        raise AssertionError(f"gave up waiting for {what} after {timeout} s: {''.join(lines)!r}")
    return lines


def announced(line):
    """Whether a line of stderr is the one every tool prints once its
    programs are attached ("tcptrace states: tracing ...; Ctrl-C to end")."""
    return bool(ANNOUNCED.match(line))


def ready(proc, timeout=READY_TIMEOUT):
    """Wait for a tool's line saying that tracing has begun on its stderr
    (a pipe); the stderr read so far."""
    return "".join(read_until(proc.stderr, lambda lines: announced(lines[-1]), "tcptrace to attach", timeout))


class Tracer:
    """tcptrace in a subprocess: started, awaited until it says tracing has
    begun, stopped with a signal, its stdout and stderr kept. `prefix` runs
    it under another program (setpriv ...)."""

    def __init__(self, *args, env=None, prefix=()):
        self.args = list(args)
        self.prefix = list(prefix)
        self.env = dict(os.environ, **(env or {}))
        self.stderr_lines = []
        self.stdout = ""
        self.returncode = None
        self._ready = threading.Event()

    def __enter__(self):
        self.proc = subprocess.Popen(
            [*self.prefix, *tcptrace_cmd(*self.args, "--verbose")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=ROOT,
        )
        self._stdout_chunks = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self._out_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._out_reader.start()
        if not self._ready.wait(READY_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"tcptrace did not attach: {self.stderr}")
        return self

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if announced(line):
                self._ready.set()
        self._ready.set()

    def _read_stdout(self):
        # os.read returns what the pipe has now; a text-mode read(n) would
        # wait for n characters and hide when rows really arrive.
        fd = self.proc.stdout.fileno()
        for chunk in iter(lambda: os.read(fd, 65536), b""):
            self._stdout_chunks.append(chunk)

    @property
    def stdout_so_far(self):
        return b"".join(self._stdout_chunks).decode(errors="replace")

    def _collect(self, timeout):
        self.proc.wait(timeout=timeout)
        self._out_reader.join(10)
        self._reader.join(10)
        self.stdout = b"".join(self._stdout_chunks).decode()
        self.returncode = self.proc.returncode
        return self.returncode

    @property
    def stderr(self):
        return "".join(self.stderr_lines)

    def stop(self, sig=signal.SIGINT, settle=0.3):
        if self.returncode is not None:
            return self.returncode
        time.sleep(settle)  # let the last events reach the buffer
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self._collect(30)

    def wait(self, timeout=60):
        return self._collect(timeout)

    def __exit__(self, *exc):
        if self.returncode is None:
            self.stop(settle=0)
        return False

    def json_objects(self):
        """The JSON output as written, envelope included."""
        return [json.loads(line) for line in self.stdout.split("\n") if line.strip()]

    def json_rows(self):
        """The JSON output, each object's envelope checked and left out."""
        return [unwrap(obj, self.args[0]) for obj in self.json_objects()]


class Peer:
    """A client or server endpoint in its own process (tests/peer.py)."""

    def __init__(self, role, host, port, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, PEER, role, host, str(port), *map(str, extra)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if role == "server":
            line = self.proc.stdout.readline()
            if "listening" not in line:
                self.proc.kill()
                raise AssertionError(f"server did not start: {self.proc.stderr.read()}")

    @property
    def pid(self):
        return self.proc.pid

    def wait(self, timeout=30):
        _out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return self.proc.returncode


def session(host, server_port, client_port, client_send=0, server_send=0, client_closes=True,
            half_close=False):
    """One TCP session between two processes; returns (server, client).

    With half_close the side that closes first shuts down, reads to EOF and
    only then closes (see peer.py)."""
    first = ("--close-first", "--half-close") if half_close else ("--close-first",)
    server = Peer("server", host, server_port, "--send", server_send, "--recv", client_send,
                  *(() if client_closes else first))
    client = Peer("client", host, server_port, "--bind-port", client_port, "--send", client_send,
                  "--recv", server_send, *(first if client_closes else ()))
    client.wait()
    server.wait()
    return server, client
