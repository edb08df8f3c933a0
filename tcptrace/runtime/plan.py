"""The plan: everything decided before the kernel is touched.

Options, the running kernel's tracepoint formats and BTF offsets become the
program's text (integer #defines only: no user string reaches the C
source) and the entries its filter maps get before attaching. Pure but for
reading formats and BTF, so `--ebpf` prints a plan without root.
"""

import os
from dataclasses import dataclass, field

from .. import btf, codegen, headers, workload
from ..errors import KernelTooOldError

RING_MIB_PER_CPU = 8  # see ring_pages()
RING_MIB_MIN, RING_MIB_MAX = 8, 64
RINGBUF_SINCE = (5, 8, 0)  # the BPF ring buffer


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
    quiet: bool = False  # no "tracing ..." line once attached
    count: bool = False
    interval: float = 0.0
    top: int = 0
    extra: dict = field(default_factory=dict)  # integer #defines (tests size maps with them)
    tool: dict = field(default_factory=dict)  # the tool's own options (spec.Option.dest -> value)
    cgroups: tuple = ()  # --cgroup: workload.Cgroup items
    netns: tuple = ()  # --netns: namespace inode numbers


def kernel_version():
    return headers.version_triple(os.uname().release)


def ringbuf_supported():
    return kernel_version() >= RINGBUF_SINCE


def _mem_total_mib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ring_pages(cpus=None, mem_mib=None, page=None):
    """The ring buffer's size in pages when --buffer-pages does not say:
    RING_MIB_PER_CPU for each CPU (events come from every CPU, the reader
    is one), from RING_MIB_MIN to RING_MIB_MAX, at most 1/256 of the
    memory, a power of two. All of it is in the reader's RSS (the kernel
    maps every page at once), so it is sized for the bursts that come while
    the reader waits for a CPU, not for a whole overload: that is what the
    reader's CPU reservation is for (priority.py). With 2 to 8 pairs of
    full-speed loopback connections on 2 CPUs, 16 MiB delivered at least
    99.99 % of the events."""
    cpus = cpus or os.cpu_count() or 1
    mem_mib = mem_mib if mem_mib is not None else _mem_total_mib()
    page = page or os.sysconf("SC_PAGE_SIZE")
    mib = min(max(cpus * RING_MIB_PER_CPU, RING_MIB_MIN), RING_MIB_MAX)
    if mem_mib:
        mib = min(mib, max(1, mem_mib // 256))
    pages = max(1, mib * 1024 * 1024 // page)
    return 1 << (pages.bit_length() - 1)


def defines_for(spec, opts, use_ring):
    defs = {}
    if use_ring:
        defs["TCPTRACE_RINGBUF"] = 1
        defs["TCPTRACE_RINGBUF_PAGES"] = opts.buffer_pages or ring_pages()
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


def filter_maps(opts):
    """The shared filters' map entries: key -> 1 (integers, sized to each
    map's key when filled)."""
    maps = {}
    for name, values in (("filter_lports", opts.lports), ("filter_rports", opts.rports),
                         ("filter_pids", opts.pids)):
        if values:
            maps[name] = [(v, 1) for v in values]
    return maps


@dataclass
class Plan:
    """The program and its inputs."""

    text: str
    formats: dict
    missing: list
    use_ring: bool
    btf: dict
    release: str
    maps: dict = field(default_factory=dict)  # map name -> [(key, value)], int or bytes
    symbols: dict = field(default_factory=dict)
    raw: tuple = ()  # the tracepoints taken raw (spec.Tracepoint.raw)


def symbols_of(formats):
    """The kernel's __print_symbolic tables: "category:event.field" -> {number: name}."""
    out = {}
    for name, fmt in formats.items():
        for fname, table in fmt.symbols.items():
            out[f"{name}.{fname}"] = table
    return out


def plan(spec, opts, source, release=None, btf_offsets=None):
    """Resolve formats, BTF offsets and options into the program text and
    its map entries. A tool's own options go through its configure(),
    which may raise spec.BadOption (a usage error)."""
    release = release or source.kernel_release()
    formats, missing = codegen.resolve(spec, source)
    if opts.buffer == "ring":
        use_ring = True
    elif opts.buffer == "perf":
        use_ring = False
    else:
        use_ring = ringbuf_supported()
    defs = defines_for(spec, opts, use_ring)
    maps = filter_maps(opts)
    symbols = symbols_of(formats)
    if spec.configure is not None:
        settings = spec.configure(dict(opts.tool), symbols)
        defs.update(settings.defines)
        for name, entries in settings.maps.items():
            maps.setdefault(name, []).extend(entries)
    found = {}
    for struct_name, members in spec.btf.items():
        offsets = btf_offsets(struct_name, members) if btf_offsets else btf.kernel_offsets(struct_name, members)
        for member, (offset, size) in (offsets or {}).items():
            found[f"{struct_name}.{member}"] = (offset, size)
            defs[f"OFF_{struct_name.upper()}_{member.upper()}"] = offset
    if "sock_cgroup_data" in spec.btf:  # an event tool: the socket's workload (workload.bpf.h)
        mode, _how = workload.mode(found)
        if opts.netns and not workload.netns_readable(found):
            raise KernelTooOldError("--netns needs the kernel's BTF to have sock_common.skc_net, net.ns and "
                                    "ns_common.inum, and this kernel's does not.")
        more, entries = workload.filter_settings(opts.cgroups, opts.netns, mode)
        defs.update(mode)
        defs.update(more)
        for name, values in entries.items():
            maps.setdefault(name, []).extend(values)
    raw = raw_tracepoints(spec, formats, found)
    for tp in raw:
        defs[f"RAW_{tp.event.upper()}"] = 1
    text = codegen.program(spec, formats, defs, release)
    return Plan(text, formats, missing, use_ring, found, release, maps, symbols, tuple(tp.name for tp in raw))


def raw_tracepoints(spec, formats, found):
    """The tracepoints of this run taken raw: those whose tool can and whose
    BTF entries this kernel has. TCPTRACE_NO_RAW_TRACEPOINTS=1 reads every
    record instead (to compare, or to rule the raw form out)."""
    if os.environ.get("TCPTRACE_NO_RAW_TRACEPOINTS", "") not in ("", "0"):
        return ()
    return [tp for tp in spec.tracepoints if tp.raw and tp.name in formats and all(need in found for need in tp.raw)]
