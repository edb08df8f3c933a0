"""A BPF ring buffer read straight from its memory mapping.

bcc hands every sample to Python through a ctypes callback (libbpf's
ring_buffer__poll -> libffi -> bcc's wrapper -> ours -> ctypes.string_at):
about 30 % of tcptrace's CPU per event went there, and a program loaded
without bcc (loader.Loaded) has no bcc to read with at all. The ring
buffer's pages can be mapped by user space (kernel 5.8+): the consumer
position page is writable, the producer position page and the data pages
are read-only. This reads every ready record in one Python loop, as
libbpf's ringbuf_process_ring() does, and waits through epoll on the map's
fd.

The kernel offers the data pages twice in a row, so that a record which
wraps past the end reads contiguously; libbpf maps both copies. Each copy
a reader touches counts in its resident memory, so this maps the data once
and joins the two pieces of the rare record that wraps: a ring buffer
sized for bursts costs its size in RSS, not twice that.

Records of the event's exact size, one after another, are read a run at a
time: one struct call reads the headers of the run and one its records
(Struct.iter_unpack over the mapping), instead of a few Python steps per
record. The headers are read first, so every record read was committed
before it was read; the run ends at the first header that is not a plain
committed record of that size, which takes the careful path alone.

Only on x86-64: Python's loads from the mapping are plain loads, which TSO
orders as the acquire loads libbpf uses (and its stores as releases);
elsewhere bcc's reader is used.

The positions are read and written by struct, possibly byte by byte. That
is still safe: positions only grow, so a torn read of the producer position
is never past the true one (reading stops early, the rest comes next poll),
and a torn consumer position seen by the kernel is never past ours (it
finds less room, never room over unread records).
"""

import mmap
import platform
import select
import struct

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SZ = 8
# At most this many records per poll: libbpf's loop (and this one) would
# otherwise go on as long as the producer keeps up, and every record read
# waits, as Python objects, for the next drain.
BATCH = 4096
# Records already read when a wait begins are written after at most this
# long (ms), not after a whole poll timeout: the reader would otherwise hold
# them until the next wakeup, which comes one event in 256 per CPU.
HOLD_MS = 10
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def supported():
    return platform.machine() in ("x86_64", "amd64")


def _max_entries(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("max_entries:"):
                return int(line.split()[1])
    raise OSError(f"no max_entries in the fdinfo of map fd {fd}")


class RingReader:
    """Reads the ring buffer map behind map_fd (which stays the caller's to
    close). size is the map's max_entries, read from fdinfo when not given."""

    def __init__(self, map_fd, record_size, event=None, size=None):
        self.fd = map_fd
        self.size = size or _max_entries(map_fd)
        page = mmap.PAGESIZE
        if self.size & (self.size - 1) or self.size % page:
            raise ValueError(f"a ring buffer of {self.size} bytes: not a power of 2 pages")
        self.mask = self.size - 1
        self.record_size = record_size
        # With the event's struct.Struct (standard sizes, padding spelled
        # out, as layout.Layout makes it), records are unpacked where they
        # lie: no bytes copy per record.
        self.event = event
        self.stride = (record_size + HDR_SZ + 7) & ~7  # header, record, padding to 8
        if event is not None:
            body = event.format.lstrip("<>=!@")
            if event.format[:1] != "<" or event.size != record_size:
                raise ValueError(f"event struct {event.format!r} is not a little-endian {record_size}-byte record")
            self._run = struct.Struct(f"<{HDR_SZ}x{body}{self.stride - HDR_SZ - record_size}x").iter_unpack
            self._heads = struct.Struct(f"<I{self.stride - 4}x").iter_unpack
            self._head_ok = (record_size,)  # committed, not discarded, the event's size
        self.cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self.prod = mmap.mmap(map_fd, page + self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError:
            self.cons.close()
            raise
        self.data_off = page
        self.data = memoryview(self.prod)[page : page + self.size]
        self.epoll = None  # made on the first wait: consume() alone needs none

    def poll(self, timeout_ms, add, add_values=None):
        """Hand the ready records to add(bytes) (or, with an event struct,
        lists of their unpacked fields to add_values()), then, unless a full batch was read, wait up to
        timeout_ms (forever if negative; HOLD_MS at most when records were
        read) for the kernel's next wakeup and hand over what came
        meanwhile. Returns how many were handed over.

        The wait is edge-triggered: it ends on a wakeup, not whenever a
        record is ready. The programs wake the reader for one event in 256
        per CPU (tcptrace.h), and a level-triggered wait would return at
        once for every record already there: a reader that has caught up
        would spin, polling, decoding and writing a few rows at a time."""
        got = self.consume(add, add_values)
        if got >= BATCH:
            return got
        if got:  # rows already read wait a little for company, not a whole timeout
            timeout_ms = HOLD_MS if timeout_ms < 0 else min(timeout_ms, HOLD_MS)
        if self.epoll is None:
            self.epoll = select.epoll()
            self.epoll.register(self.fd, select.EPOLLIN | select.EPOLLET)
        self.epoll.poll(timeout_ms / 1000.0 if timeout_ms >= 0 else -1)
        return got + self.consume(add, add_values)

    def consume(self, add, add_values=None):
        """Hand every committed record to add(bytes), or, with an event
        struct and add_values, lists of unpacked records to add_values();
        returns how many records were handed over."""
        cons_mm, prod_mm = self.cons, self.prod
        u32 = _U32.unpack_from
        mask, base, want, size, stride = self.mask, self.data_off, self.record_size, self.size, self.stride
        end = base + size
        by_run = self.event is not None and add_values is not None
        if by_run:
            data, run, heads, head_ok = self.data, self._run, self._heads, self._head_ok
            unpack_from = self.event.unpack_from
        cons = _U64.unpack_from(cons_mm, 0)[0]
        got = 0
        while got < BATCH:
            progressed = False
            prod = _U64.unpack_from(prod_mm, 0)[0]
            while cons < prod and got < BATCH:
                if by_run:
                    at = cons & mask
                    n = min((prod - cons) // stride, (size - at) // stride, BATCH - got)
                    if n:
                        view = data[at : at + n * stride]
                        seen = list(heads(view))
                        if seen.count(head_ok) != n:
                            n = next(i for i, h in enumerate(seen) if h != head_ok)
                            view = view[: n * stride]
                        if n:
                            add_values(list(run(view)))
                            got += n
                            cons += n * stride
                            progressed = True
                            continue
                off = base + (cons & mask)
                hdr = u32(prod_mm, off)[0]
                if hdr & BUSY_BIT:
                    # Reserved, not yet committed: records after it wait too,
                    # or the consumer position would pass it.
                    _U64.pack_into(cons_mm, 0, cons)
                    return got
                progressed = True
                length = hdr & ~(BUSY_BIT | DISCARD_BIT)
                if not hdr & DISCARD_BIT:
                    start = off + HDR_SZ
                    take = length if length < want else want
                    buf = prod_mm
                    if start + take > end:  # wraps past the end of the data: join its two pieces
                        buf, start = prod_mm[start:end] + prod_mm[base : base + start + take - end], 0
                    if by_run and length >= want:
                        add_values([unpack_from(buf, start)])
                    else:
                        add(buf[start : start + take])
                    got += 1
                cons += (length + HDR_SZ + 7) & ~7
            _U64.pack_into(cons_mm, 0, cons)
            if not progressed:
                return got
        return got

    def fill(self):
        """The filled fraction of the buffer: written, not yet read."""
        return (_U64.unpack_from(self.prod, 0)[0] - _U64.unpack_from(self.cons, 0)[0]) / self.size

    def count_ready(self, until_ns=None):
        """How many committed records wait to be read (the consumer
        position stays where it is); with until_ns, only those whose first
        field, a u64 kernel time, is at most until_ns."""
        mask, base = self.mask, self.data_off
        cons = _U64.unpack_from(self.cons, 0)[0]
        prod = _U64.unpack_from(self.prod, 0)[0]
        count = 0
        while cons < prod:
            hdr = _U32.unpack_from(self.prod, base + (cons & mask))[0]
            if hdr & BUSY_BIT:
                break
            length = hdr & ~(BUSY_BIT | DISCARD_BIT)
            if not hdr & DISCARD_BIT and (
                until_ns is None
                # 8-aligned in a data area of whole pages: the time never wraps
                or (length >= 8 and _U64.unpack_from(self.prod, base + ((cons + HDR_SZ) & mask))[0] <= until_ns)
            ):
                count += 1
            cons += (length + HDR_SZ + 7) & ~7
        return count

    def close(self):
        if self.data is not None:
            self.data.release()
            self.data = None
        for m in (self.cons, self.prod):
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        if self.epoll is not None:
            self.epoll.close()
            self.epoll = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
