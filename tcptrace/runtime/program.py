"""One interface for a program in the kernel, whichever way it got there.

Two implementations: CachedProgram (loaded by bpfsys from a Compiled, no
bcc in the process) and bcc.BccProgram (built and loaded by bcc). Both
offer: map(name) at the byte level, attach() (raw=True: as a raw tracepoint),
program_fds(), open_events()
returning poll(timeout_ms), count_ready(ended_ns), fill() (the buffer's filled
fraction, None when unknown) and close(). The session
never asks which one it has.
"""

from . import bpfsys, ringbuf


class CachedProgram:
    def __init__(self, compiled, build_mode="cached", bcc_version="unknown", where="-", built_apart=False):
        self.loaded = bpfsys.Loaded(compiled)
        self.build_mode = build_mode  # "cached", or how bcc built it on this run
        self.bcc_version = bcc_version
        self.where = where
        self.built_apart = built_apart  # built by bcc in a child process: bcc never entered this one
        self.reader = None

    @property
    def origin(self):
        if self.build_mode == "cached":
            return f"compiled program from the cache (built by bcc {self.bcc_version} before)"
        apart = " in a child process" if self.built_apart else ""
        return f"bcc {self.bcc_version} from {self.where}; {self.build_mode} build{apart}"

    def map(self, name):
        return self.loaded[name]

    def attach(self, tracefs_root, tracepoint, function, raw=False):
        if raw:
            self.loaded.attach_raw_tracepoint(tracepoint, function)
        else:
            self.loaded.attach_tracepoint(tracefs_root, tracepoint, function)

    def program_fds(self, functions):
        return {name: self.loaded.programs[name] for name in functions if name in self.loaded.programs}

    def open_events(self, add, add_values, size, event_struct, use_ring, pages, batch_max, pending):
        # Read from the ring's mapping: no ctypes call per sample, and each
        # sample unpacked where it lies.
        events = self.loaded["events"]
        self.reader = ringbuf.RingReader(events.fd, size, event_struct, size=events.max_entries)
        read = self.reader.poll
        return lambda timeout: read(timeout, add, add_values)

    def count_ready(self, ended_ns):
        return self.reader.count_ready(ended_ns) if self.reader is not None else 0

    def fill(self):
        return self.reader.fill() if self.reader is not None else None

    def close(self):
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
