"""The runtime: the only module that imports bcc.

It finds bcc, checks privileges, mounts tracefs when needed, reads the
formats of the tracepoints a tool uses, builds the program without kernel
headers, attaches it, polls the ring or perf buffer, counts lost events and
detaches. Every bcc failure becomes one of our error types here.
"""

import contextlib
import ctypes
import importlib
import json
import os
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass, field

from . import btf, codegen, headers, tracefs
from .errors import (
    BccMissingError,
    BuildError,
    PrivilegeError,
    TcptraceError,
    TracefsError,
)
from .output import silence_stdout
from .spec import DecodeContext

CAP_PERFMON = 38
CAP_BPF = 39
POLL_MS = 100
LAST_DRAIN_S = 2.0  # how long the end of a run may spend printing what is still buffered
RING_PAGES = 16384  # 64 MiB; see defines_for()
STATS_EVERY_S = 1.0
STAT_LOST_OUTPUT, STAT_UNTRACKED = 0, 1
BPF_NOEXIST = 1  # a map update that only creates
# Samples taken per poll at most: libbpf's ring loop would otherwise go on as
# long as the producer keeps up, and every sample waits, as a Python object,
# for the next drain.
BATCH_MAX = 4096

# Where distributions put bcc's pure-Python module, for a Python (a venv,
# pyenv) that does not see the distribution's site directory.
BCC_DIRS = (
    "/usr/lib/python3/dist-packages",
    "/usr/lib/python{v}/site-packages",
    "/usr/lib64/python{v}/site-packages",
    "/usr/local/lib/python{v}/dist-packages",
    "/usr/share/bcc/python",
)


def bcc_package_hint():
    """The package that provides bcc's Python module on this distribution."""
    ids = ""
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith(("ID=", "ID_LIKE=")):
                    ids += " " + line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    if re.search(r"\b(debian|ubuntu)\b", ids):
        return "install it with: apt-get install python3-bpfcc"
    if re.search(r"\b(fedora|rhel|centos)\b", ids):
        return "install it with: dnf install python3-bcc"
    if re.search(r"\barch\b", ids):
        return "install it with: pacman -S python-bcc"
    return "install your distribution's bcc Python package (python3-bpfcc on Debian/Ubuntu, python3-bcc on Fedora)"


def _is_real_bcc(module):
    return hasattr(module, "BPF") and hasattr(module, "__file__")


def find_bcc():
    """Import the distribution's bcc module; returns (module, where).

    The PyPI package named bcc is an unrelated project: a module without
    bcc.BPF is not accepted.
    """
    for mod in [m for m in sys.modules if m == "bcc" or m.startswith("bcc.")]:
        if not _is_real_bcc(sys.modules.get("bcc")):
            del sys.modules[mod]
    try:
        import bcc

        if _is_real_bcc(bcc):
            return bcc, os.path.dirname(bcc.__file__)
        del sys.modules["bcc"]
    except ImportError:
        pass
    except Exception as e:  # a broken install: libbcc missing, ABI mismatch
        raise BccMissingError(f"bcc's Python module is installed but fails to load ({e}); {bcc_package_hint()}.")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for template in BCC_DIRS:
        path = template.format(v=version)
        if not os.path.isfile(os.path.join(path, "bcc", "__init__.py")):
            continue
        sys.path.append(path)
        try:
            module = importlib.import_module("bcc")
            if _is_real_bcc(module):
                return module, os.path.dirname(module.__file__)
        except Exception as e:
            raise BccMissingError(
                f"bcc's Python module in {path} fails to load ({e}); {bcc_package_hint()}."
            )
        finally:
            sys.path.remove(path)
    raise BccMissingError(f"bcc's Python module was not found; {bcc_package_hint()}.")


def capabilities():
    """The effective capability mask of this process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges():
    if os.geteuid() == 0:
        return
    caps = capabilities()
    if caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON):
        return
    raise PrivilegeError(
        "tcptrace loads BPF programs into the kernel: run it as root (sudo) or with CAP_BPF and CAP_PERFMON."
    )


def formats_source(formats_dir=None):
    """Where format files come from: a saved directory, or tracefs (mounted
    here if it is not yet)."""
    hidden = tracefs.hidden_from_env()
    if formats_dir:
        return tracefs.FormatSource(formats_dir, hidden)
    root = tracefs.ensure_mounted()
    if not root:
        if os.geteuid() != 0:
            raise TracefsError(
                "tracefs is not mounted and only root can mount it: mount -t tracefs nodev /sys/kernel/tracing."
            )
        raise TracefsError("tracefs is not mounted and mounting it on /sys/kernel/tracing failed.")
    if not os.access(os.path.join(root, "events"), os.R_OK | os.X_OK):
        raise TracefsError(f"tracefs at {root} is not readable by this user: run tcptrace as root.")
    return tracefs.FormatSource(root, hidden)


def kernel_version():
    return headers.version_triple(os.uname().release)


def ringbuf_supported():
    return kernel_version() >= (5, 8, 0)


@dataclass
class RunOptions:
    output: str = "table"
    wide: bool = False
    time: bool = False
    timestamp: bool = False
    extended: bool = False
    family: int = 0  # 0 for both, else AF_INET / AF_INET6
    pids: tuple = ()
    lports: tuple = ()
    rports: tuple = ()
    duration: float = 0.0
    max_events: int = 0
    buffer: str = "auto"
    buffer_pages: int = 0
    verbose: bool = False
    count: bool = False
    interval: float = 0.0
    top: int = 0
    extra: dict = field(default_factory=dict)  # tool-specific integer settings


def defines_for(spec, opts, use_ring):
    defs = {}
    if use_ring:
        defs["TCPTRACE_RINGBUF"] = 1
        # 64 MiB, about 600,000 state changes: a reader in its own session
        # (its own scheduler autogroup) was measured to wait up to 1.5 s on
        # the run queue while a full-speed loopback load ran on every CPU,
        # and 8 MiB then lost most events. The kernel allocates all of it;
        # the reader's RSS grows only by the part a burst fills.
        defs["TCPTRACE_RINGBUF_PAGES"] = opts.buffer_pages or RING_PAGES
    if opts.family:
        defs["FILTER_FAMILY"] = opts.family
    if opts.lports:
        defs["FILTER_LPORTS"] = 1
    if opts.rports:
        defs["FILTER_RPORTS"] = 1
    if opts.pids:
        defs["FILTER_PIDS"] = 1
    if opts.extended:
        defs["TCPTRACE_EXTENDED"] = 1
    if opts.count:
        defs["TCPTRACE_COUNT"] = 1
    for name, value in opts.extra.items():
        defs[name] = value
    return defs


@dataclass
class Plan:
    """Everything decided before bcc is touched: the program and its inputs."""

    text: str
    formats: dict
    missing: list
    use_ring: bool
    btf: dict
    release: str


def plan(spec, opts, source, release=None, btf_offsets=None):
    """Resolve formats, BTF offsets and options into the program text."""
    release = release or source.kernel_release()
    formats, missing = codegen.resolve(spec, source)
    if opts.buffer == "ring":
        use_ring = True
    elif opts.buffer == "perf":
        use_ring = False
    else:
        use_ring = ringbuf_supported()
    defs = defines_for(spec, opts, use_ring)
    found = {}
    for struct_name, members in spec.btf.items():
        offsets = btf_offsets(struct_name, members) if btf_offsets else btf.kernel_offsets(struct_name, members)
        for member, (offset, size) in (offsets or {}).items():
            found[f"{struct_name}.{member}"] = (offset, size)
            defs[f"OFF_{struct_name.upper()}_{member.upper()}"] = offset
    text = codegen.program(spec, formats, defs, release)
    return Plan(text, formats, missing, use_ring, found, release)


def symbols_of(formats):
    out = {}
    for name, fmt in formats.items():
        for fname, table in fmt.symbols.items():
            out[f"{name}.{fname}"] = table
    return out


class StopWriting(Exception):
    """A stop signal came while tcptrace was writing: the write may be one
    that never ends (a pipe whose reader is alive but no longer reads)."""


class Stopper:
    """SIGINT, SIGTERM and SIGHUP end the run at the next poll. Output under
    way when one comes may take GRACE_S more to finish, so a stop loses no
    row a reader is taking; a write still blocked then (a pipe whose reader
    is alive but no longer reads) is abandoned, as is any write at a second
    signal. Output after a stop (the last drain, the report) has the same
    grace."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    GRACE_S = 1.0

    def __init__(self):
        self.stop = False
        self.stopped_ns = None
        self.writing = False

    def __enter__(self):
        for sig in self.SIGNALS + (signal.SIGALRM,):
            signal.signal(sig, self._handle)
        return self

    def _abandon(self):
        self.writing = False
        raise StopWriting()

    def _handle(self, signum, frame):
        if signum == signal.SIGALRM:  # the grace is over
            if self.writing:
                self._abandon()
            return
        again = self.stop
        if not again:
            self.stopped_ns = time.monotonic_ns()  # the end of the run: the clock of the events' times
        self.stop = True
        if self.writing:
            if again:
                self._abandon()
            signal.setitimer(signal.ITIMER_REAL, self.GRACE_S)

    @contextlib.contextmanager
    def output(self):
        """Around a write that a stop signal may abandon."""
        self.writing = True
        if self.stop:
            signal.setitimer(signal.ITIMER_REAL, self.GRACE_S)
        try:
            yield
        finally:
            self.writing = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc):
        # The handlers stay: a second Ctrl-C while the run finishes (the
        # last drain, a count summary, detaching) is absorbed, not a
        # KeyboardInterrupt in the middle of cleaning up.
        signal.setitimer(signal.ITIMER_REAL, 0)
        return False


def build_attempts(release):
    """How a program is built, in the order tried: (mode, BCC_KERNEL_SOURCE
    or None for bcc's own search)."""
    try:
        kdir = headers.ensure(btf.cache_dir(), release)
    except OSError:
        kdir = headers.ensure(os.path.join("/tmp", f"tcptrace-{os.geteuid()}"), release)
    attempts = [("header-free", kdir)]
    # Real headers help only when they are the running kernel's own.
    if release == os.uname().release and os.path.isdir(f"/lib/modules/{release}/build"):
        attempts.append(("kernel-headers", None))
    return attempts


def build_program(bcc, text, release, what="the program", say=None):
    """Compile with bcc, header-free first; returns (the BPF object, mode)."""
    saved = os.environ.get("BCC_KERNEL_SOURCE")
    last = None
    try:
        for mode, path in build_attempts(release):
            if path:
                os.environ["BCC_KERNEL_SOURCE"] = path
            elif saved is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = saved
            try:
                return bcc.BPF(text=text.encode()), mode
            except Exception as e:
                last = e
                if say:
                    say(f"{mode} build failed: {e}")
    finally:
        if saved is None:
            os.environ.pop("BCC_KERNEL_SOURCE", None)
        else:
            os.environ["BCC_KERNEL_SOURCE"] = saved
    raise BuildError(
        f"the BPF program of {what} failed to compile with bcc "
        f"{getattr(bcc, '__version__', '?')} ({_first_line(last)}); the compiler's messages are above."
    )


class Session:
    """One loaded program: build, attach, poll, detach.

    With buffer=False the program only counts into maps, which the caller
    reads (read_percpu, read_table): no event buffer is opened."""

    def __init__(self, spec, opts, writer, err=sys.stderr, buffer=True):
        self.spec = spec
        self.opts = opts
        self.writer = writer
        self.err = err
        self.bpf = None
        self.bcc = None
        self.bcc_where = "-"
        self.loaded = None  # the program loaded without bcc (see _load)
        self.reader = None
        self.lost = 0
        self.lost_reported = 0
        self.skipped = 0  # events the kernel never handed to the program (in self.lost too)
        self.unprinted = 0  # events handed over that the run ended without printing (in self.lost too)
        self.abandoned = 0  # of those, rows whose output was abandoned at the stop
        self.flushed_rows = 0  # rows written and flushed
        self.untracked = 0
        self.malformed = 0  # count keys decode() could not make sense of
        self.stream = None
        self.callback_error = None
        self.build_mode = ""
        self.counting = bool(opts.count and spec.counter)
        self.buffered = buffer and not self.counting
        self.attached = []  # the tracepoints attached, in the spec's order
        self.built_by = None  # the bcc version of a build made in a child process

    def say(self, text):
        self.err.write(f"tcptrace: {text}\n")
        self.err.flush()

    def verbose(self, text):
        if self.opts.verbose:
            self.say(text)

    # -- set-up ---------------------------------------------------------------

    def open(self):
        t0 = time.monotonic()
        check_privileges()
        source = formats_source()
        self.plan = plan(self.spec, self.opts, source)
        for tp, why in self.plan.missing:
            self.verbose(f"{tp.name} unavailable on this kernel ({why}): its columns stay blank")
        self.ctx = DecodeContext(
            wide=self.opts.wide,
            extended=self.opts.extended,
            symbols=symbols_of(self.plan.formats),
            btf=self.plan.btf,
        )
        self.ctx.owners = self._owner_resolver()
        self._load()
        t1 = time.monotonic()
        self._fill_filters()
        self._attach()
        self._seed_listeners()
        if self.buffered:
            self._open_buffer()
        origin = (f"compiled program from the cache (built by bcc {self.bcc_version} before)"
                  if self.build_mode == "cached" else
                  f"bcc {self.bcc_version} from {self.bcc_where}; {self.build_mode} build"
                  + (" in a child process" if self.built_by else ""))
        self.verbose(
            f"{origin}; "
            f"{'ring' if self.plan.use_ring else 'perf'} buffer; "
            f"ready in {time.monotonic() - t0:.3f} s (build {t1 - t0:.3f} s)"
        )

    def _seed_listeners(self):
        """Owners of listeners opened before tracing, from /proc, for programs
        with owner tracking: the connections they accept then inherit one."""
        try:
            table = self.map("listen_owners")
        except KeyError:
            return
        from .procfs import listener_owners

        for port, (pid, comm) in listener_owners().items():
            owner = struct.pack("<II16s", pid, 1, comm.encode()[:15])  # struct owner in tcptrace.h
            try:
                table.update(port.to_bytes(2, sys.byteorder), owner, BPF_NOEXIST)
            except FileExistsError:  # learned since attaching: the kernel knows better
                continue
            except OSError:  # the map is full: those owners stay unknown
                break

    def _owner_resolver(self):
        from .procfs import OwnerResolver

        return OwnerResolver()

    def _build(self, bcc):
        self.bpf, self.build_mode = build_program(
            bcc, self.plan.text, os.uname().release, f"`tcptrace {self.spec.name}`", self.verbose
        )

    def _load(self):
        """The program in the kernel: from the cache of compiled programs
        when this exact program was built before on this kernel (no bcc, no
        LLVM: a fraction of the start-up time and memory), else compiled
        with bcc, then captured into the cache and loaded from it, so both
        runs take the same path. Per-CPU perf buffers (kernels before 5.8,
        --buffer perf), other machines and anything the loader cannot
        reproduce stay with bcc."""
        from . import loader, ringbuf

        version = loader.bcc_version(BCC_DIRS)
        path = None
        if (self.plan.use_ring and loader.supported() and ringbuf.supported() and version
                and not os.environ.get("TCPTRACE_NO_CACHE")):
            path = loader.cache_path(self.plan.text, self.plan.release, version)
            compiled = None
            try:
                compiled = loader.read_cache(path)
            except loader.CacheError as e:
                self.verbose(f"{e}; building with bcc")
            if compiled is not None:
                try:
                    self.loaded = loader.Loaded(compiled)
                    self.build_mode = "cached"
                    return
                except loader.LoaderError as e:
                    self.verbose(f"the cached program did not load ({e}); building with bcc")
        functions = [tp.function for tp in self.spec.tracepoints if tp.name in self.plan.formats]
        if path is not None and not os.environ.get("TCPTRACE_BUILD_HERE"):
            compiled = self._build_apart(functions)
            if compiled is not None:
                try:
                    self.loaded = loader.Loaded(compiled)
                except loader.LoaderError as e:
                    self.verbose(f"the program built apart did not load ({e}); building here")
                else:
                    if not loader.write_cache(path, compiled):
                        self.verbose(f"the compiled program could not be cached in {os.path.dirname(path)}")
                    return
        bcc, self.bcc_where = find_bcc()
        self.bcc = bcc
        self._build(bcc)
        if path is None:
            return
        try:
            compiled = loader.capture(self.bpf, functions)
            loaded = loader.Loaded(compiled)
        except loader.LoaderError as e:
            self.verbose(f"not cached ({e}): running on bcc")
            return
        if not loader.write_cache(path, compiled):
            self.verbose(f"the compiled program could not be cached in {os.path.dirname(path)}")
        self.loaded = loaded
        self.bpf.cleanup()
        self.bpf = None

    def _build_apart(self, functions):
        """Compile with bcc in a child process, which hands the program back
        captured (loader.Compiled): bcc and LLVM, about 110 MiB, are then
        never mapped into this process, which may run for days. None when
        the child did not manage it: the caller builds here, and that build
        says why (the child's messages are dropped then, not shown twice)."""
        import tempfile

        from . import loader

        try:
            log = tempfile.TemporaryFile()
            r, w = os.pipe()
        except OSError:
            return None
        for stream in (sys.stdout, sys.stderr, self.err):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        pid = os.fork()
        if pid == 0:  # the child: reports on the pipe, never returns
            status = 1
            try:
                os.close(r)
                os.dup2(log.fileno(), 2)  # bcc's and the compiler's messages, too
                self.err = os.fdopen(os.dup(log.fileno()), "w")
                bcc, where = find_bcc()
                self.bcc = bcc
                self._build(bcc)
                reply = {"mode": self.build_mode, "where": where, "version": self.bcc_version,
                         "program": loader.capture(self.bpf, functions).to_json()}
                with os.fdopen(w, "w") as out:
                    out.write(json.dumps(reply))
                status = 0
            except BaseException:
                pass
            finally:
                os._exit(status)
        os.close(w)
        try:
            with os.fdopen(r) as pipe:
                text = pipe.read()
            _, status = os.waitpid(pid, 0)
        except BaseException:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            log.close()
            raise
        with log:
            log.seek(0)
            messages = log.read().decode(errors="replace")
        if status != 0 or not text:
            self.verbose("the build in a child process failed; building here")
            return None
        try:
            reply = json.loads(text)
            compiled = loader.Compiled.from_json(reply["program"])
        except (ValueError, KeyError, TypeError) as e:
            self.verbose(f"the child's build came back unusable ({e}); building here")
            return None
        if messages:
            self.err.write(messages)
            self.err.flush()
        self.bcc_where, self.build_mode = reply.get("where", "-"), reply.get("mode", "")
        self.built_by = reply.get("version")
        return compiled

    def map(self, name):
        """A map of the program, read and written as bytes, on either path."""
        if self.loaded is not None:
            return self.loaded[name]
        return _BccMap(self.bpf[name])

    def _fill_filters(self):
        for table, values in (
            ("filter_lports", self.opts.lports),
            ("filter_rports", self.opts.rports),
            ("filter_pids", self.opts.pids),
        ):
            if values:
                m = self.map(table)
                for v in values:
                    m.update(v.to_bytes(m.key_size, sys.byteorder), b"\x01")

    def _attach(self):
        for tp in self.spec.tracepoints:
            if tp.name not in self.plan.formats:
                continue
            try:
                if self.loaded is not None:
                    # The live tracefs: the formats may come from elsewhere, the IDs may not.
                    self.loaded.attach_tracepoint(tracefs.find_mount(), tp.name, tp.function)
                else:
                    self.bpf.attach_tracepoint(tp=tp.name, fn_name=tp.function)
                self.attached.append(tp.name)
            except Exception as e:
                self.close()
                raise BuildError(
                    f"attaching to {tp.name} failed ({_first_line(e)}): the kernel's verifier may have "
                    "rejected the program (its log is above)."
                )

    def _write_batch(self):
        """The writer's batch path, or the tool's own for its table."""
        from .output import batch_for

        return batch_for(self.spec, self.writer)

    def _open_buffer(self):
        from .stream import EventStream

        self.stream = EventStream(
            self.spec, self.ctx, self.writer.row, self.opts.max_events, ordered=self.plan.use_ring,
            write_batch=self._write_batch(),
        )
        size = self.spec.event.size
        add = self.stream.add
        if self.loaded is not None:
            from . import ringbuf

            # Read from the ring's mapping: no ctypes call per sample, and
            # each sample unpacked where it lies.
            events = self.loaded["events"]
            self.reader = ringbuf.RingReader(events.fd, size, self.spec.event.struct, size=events.max_entries)
            add_values = self.stream.add_values
            self._poll = lambda timeout, read=self.reader.poll: read(timeout, add, add_values)
            return
        events = self.bpf["events"]
        string_at = ctypes.string_at
        stream = self.stream

        def on_sample(_ctx_or_cpu, data, length):
            add(string_at(data, length if length < size else size))
            # A negative return ends libbpf's ring loop (this sample is
            # consumed): batches stay bounded while the producer keeps up.
            return -1 if len(stream.pending) >= BATCH_MAX else 0

        if self.plan.use_ring:
            events.open_ring_buffer(on_sample)
            self._poll = self.bpf.ring_buffer_poll
        else:
            # Losses are counted by the program itself (tcptrace_stats); the
            # perf buffer's own count would add the same drops again, later.
            events.open_perf_buffer(on_sample, page_cnt=self.opts.buffer_pages or 64, lost_cb=lambda count: None)
            self._poll = self.bpf.perf_buffer_poll

    # -- the loop -------------------------------------------------------------

    def read_stats(self):
        try:
            table = self.map("tcptrace_stats")
            lost = table.sum(STAT_LOST_OUTPUT.to_bytes(4, sys.byteorder))
            self.untracked = table.sum(STAT_UNTRACKED.to_bytes(4, sys.byteorder))
        except (KeyError, OSError):
            return
        self.skipped = self.recursion_misses()
        self.lost = lost + self.skipped + self.unprinted

    def program_fds(self):
        """The fds of the programs attached, by function name."""
        out = {}
        for tp in self.spec.tracepoints:
            if tp.name not in self.attached:
                continue
            if self.loaded is not None:
                fd = self.loaded.programs.get(tp.function)
            else:
                fn = getattr(self.bpf, "funcs", {}).get(tp.function.encode())
                fd = getattr(fn, "fd", None)
            if fd is not None:
                out[tp.function] = fd
        return out

    def recursion_misses(self):
        """Events the kernel did not hand to our programs because one was
        already running on that CPU (a tracepoint hit again from an
        interrupt): lost as surely as a full buffer, but counted only in the
        programs' own statistics."""
        from .loader import prog_recursion_misses

        total = 0
        for fd in self.program_fds().values():
            try:
                total += prog_recursion_misses(fd)
            except OSError:
                continue
        return total

    @property
    def bcc_version(self):
        version = getattr(getattr(self, "bcc", None), "__version__", None) or self.built_by
        if version is None:
            from .loader import bcc_version

            version = bcc_version(BCC_DIRS)
        return version or "unknown"

    def read_percpu(self, name, key=0):
        """One entry of a per-CPU array: its bytes on each possible CPU."""
        table = self.map(name)
        return table.values(key.to_bytes(table.key_size, sys.byteorder))

    def read_table(self, name):
        """Every (key, value) of a hash map, as bytes."""
        return list(self.map(name).items())

    def report_lost(self):
        if self.lost > self.lost_reported:
            why = "the output buffer did not take them"
            if self.skipped:
                why += f", or the kernel skipped the program ({self.skipped} in all: it was already running on that CPU)"
            self.say(f"lost {self.lost - self.lost_reported} events ({why}; {self.lost} in all)")
            self.lost_reported = self.lost

    def read_counts(self, clear):
        """Rows of the in-kernel counts, busiest first, COUNT last."""
        counter = self.spec.counter
        table = self.map("counts")
        items = table.pop_all() if clear else list(table.items())
        rows = []
        for raw, value in items:
            try:
                values = counter.key.struct.unpack(raw[: counter.key.size])
                row = counter.decode(values, self.ctx)
            except Exception:
                self.malformed += 1
                continue
            rows.append(tuple(row) + (int.from_bytes(value[:8], sys.byteorder),))
        rows.sort(key=lambda r: r[-1], reverse=True)
        if self.opts.top:
            rows = rows[: self.opts.top]
        return rows

    def print_counts(self, clear):
        from .spec import Column

        columns = list(self.spec.counter.columns) + [Column("count", "COUNT", 8, "d", right=True)]
        title = time.strftime("%H:%M:%S") if self.opts.interval else None
        self.writer.summary(columns, self.read_counts(clear), title=title)
        self.writer.flush()

    def run_counting(self):
        start = time.monotonic()
        deadline = start + self.opts.duration if self.opts.duration else None
        next_print = start + self.opts.interval if self.opts.interval else None
        with Stopper() as stopper:
            try:
                while not stopper.stop:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        break
                    if next_print is not None and now >= next_print:
                        with stopper.output():
                            self.print_counts(clear=True)
                        next_print += self.opts.interval
                    time.sleep(min(0.1, max(0.001, (deadline or now + 1) - now)))
                self.read_stats()
                with stopper.output():
                    self.print_counts(clear=bool(self.opts.interval))
            except StopWriting:  # stdout takes no more: drop what it holds
                silence_stdout()
            return self.final_report(stopper, with_lost=False)

    def run(self):
        """Poll until a signal, --duration or --max-events; returns the exit status."""
        if self.counting:
            return self.run_counting()
        deadline = time.monotonic() + self.opts.duration if self.opts.duration else None
        next_stats = time.monotonic() + STATS_EVERY_S
        writer = self.writer
        ended_ns = None  # when the loop ended, if no signal ended it
        with Stopper() as stopper:
            try:
                while not stopper.stop:
                    timeout = POLL_MS
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        timeout = max(1, min(POLL_MS, int(left * 1000)))
                    self._poll(timeout)
                    with stopper.output():
                        done = self.stream.drain()
                        writer.flush()
                    self.flushed_rows = self.stream.rows
                    now = time.monotonic()
                    if now >= next_stats:
                        self.read_stats()
                        with stopper.output():
                            self.report_lost()
                        next_stats = now + STATS_EVERY_S
                    if done:
                        break
                ended_ns = time.monotonic_ns()  # the clock of the events' times
                if not self.stream.done:
                    self._last_drain(stopper)
            except StopWriting:  # stdout takes no more: drop what it holds
                silence_stdout()
                # The batch being written, and rows written since the last
                # flush: some may have reached the output, maybe none.
                self.abandoned = self.stream.handed - self.flushed_rows
            self._count_unprinted(stopper.stopped_ns or ended_ns or time.monotonic_ns())
            self.read_stats()
            return self.final_report(stopper)

    def _last_drain(self, stopper):
        """Events already in the buffer when the run ends count: read until
        it is empty, for at most LAST_DRAIN_S (what is left then is counted
        by _count_unprinted)."""
        from .ringbuf import BATCH

        end = time.monotonic() + LAST_DRAIN_S
        while True:
            got = self._poll(0)
            with stopper.output():
                done = self.stream.drain()
                self.writer.flush()
            self.flushed_rows = self.stream.rows
            if done or not got or got < BATCH or time.monotonic() >= end:
                return

    def _count_unprinted(self, ended_ns):
        """Events of the run (up to ended_ns, when it ended) that it did not
        print, because output was abandoned or the last drain ran out of
        time, are lost too: counted and named, never dropped in silence.
        Events after the end, while the programs are still attached, are
        not the run's."""
        if self.stream is None or self.stream.done:
            return
        stream = self.stream
        left = self.abandoned + len(stream.pending) + sum(1 for v in stream.pending_values if v[0] <= ended_ns)
        stream.pending, stream.pending_values = [], []
        if self.reader is not None:
            left += self.reader.count_ready(ended_ns)
        self.unprinted += left
        self.lost_reported += left  # named by finish_report, not as a buffer loss


    def final_report(self, stopper, with_lost=True):
        """The losses and totals on stderr, and the exit status."""
        from .errors import EXIT_LOST_EVENTS, EXIT_OK

        try:
            with stopper.output():  # stderr can be a pipe nobody reads, too
                if with_lost:
                    self.report_lost()
                self.finish_report()
        except StopWriting:
            pass
        return EXIT_LOST_EVENTS if self.lost else EXIT_OK

    def finish_report(self):
        stream = self.stream
        if self.unprinted:
            cut = (f" ({self.abandoned} of them in output abandoned at the stop, which may have taken some)"
                   if self.abandoned else "")
            self.say(f"{self.unprinted} events of the run were not printed when it ended{cut}")
        if self.lost:
            printed = f"; {stream.rows} printed" if stream else ""
            self.say(f"{self.lost} events lost in all{printed}")
        if self.untracked:
            self.say(f"{self.untracked} sockets were not tracked (a per-socket map was full)")
        if stream and stream.short:
            self.say(f"{stream.short} samples were shorter than the event and not decoded")
        malformed = self.malformed + (stream.malformed if stream else 0)
        if malformed:
            self.say(f"{malformed} samples could not be decoded")

    def close(self):
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception:
                pass
            self.bpf = None


class _BccMap:
    """A bcc table through the loader's byte-level map interface, so the
    session reads and writes maps the same way on both paths."""

    def __init__(self, table):
        self.table = table
        self.key_size = ctypes.sizeof(table.Key)

    def update(self, key, value, flags=0):
        k = self.table.Key.from_buffer_copy(key)
        if flags == BPF_NOEXIST and k in self.table:
            raise FileExistsError(f"key {key.hex()} exists")
        leaf = self.table.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), value, min(len(value), ctypes.sizeof(leaf)))
        self.table[k] = leaf

    def items(self):
        for key, value in self.table.items():
            yield bytes(key), bytes(value)

    def pop_all(self):
        try:
            items = list(self.table.items_lookup_and_delete_batch())
        except Exception:  # kernels before 5.6 have no batch operations
            items = list(self.table.items())
            self.table.clear()
        return [(bytes(k), bytes(v)) for k, v in items]

    def values(self, key):
        value = self.table.getvalue(self.table.Key.from_buffer_copy(key))
        raw = bytes(value)
        size = ctypes.sizeof(self.table.sLeaf)
        return [raw[i : i + size] for i in range(0, len(raw), size)]

    def sum(self, key):
        return sum(int.from_bytes(v, sys.byteorder) for v in self.values(key))


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


def run(spec, opts, writer, err=sys.stderr):
    session = Session(spec, opts, writer, err)
    try:
        session.open()
        if not session.counting:
            writer.header()
            writer.flush()
        return session.run()
    finally:
        session.close()


__all__ = ["run", "plan", "RunOptions", "find_bcc", "check_privileges", "TcptraceError"]
