"""bcc: the only module that imports it.

It finds the distribution's bcc module (never PyPI's unrelated package of
that name), compiles a program header-free (or with the running kernel's
own headers), captures what the kernel was given so later runs load it
without bcc (compiled.Compiled), and wraps a bcc-built program in the
runtime's Program interface. Every bcc failure becomes one of our errors
here.
"""

import ctypes
import importlib
import os
import platform
import re
import sys

from .. import btf, headers
from ..errors import BccMissingError, BuildError, Unsupported
from .bpfsys import BPF_NOEXIST, map_info
from .compiled import (
    BPF_PROG_TYPE_RAW_TRACEPOINT,
    BPF_PROG_TYPE_TRACEPOINT,
    MAP_TYPES,
    Compiled,
    MapSpec,
    ProgSpec,
    relocations,
)

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


def build_attempts(release):
    """How a program is built, in the order tried: (mode, BCC_KERNEL_SOURCE
    or None for bcc's own search)."""
    try:
        kdir = headers.ensure(btf.cache_dir(), release)
    except OSError:  # no usable cache: a private directory for this build only
        import tempfile

        kdir = headers.ensure(tempfile.mkdtemp(prefix="tcptrace-"), release)
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




def _bcc_lib(bpf_object):
    """libbcc as the bcc module that made bpf_object loaded it, or None: the
    object is duck-typed, so bcc is found through it, never imported here."""
    module = sys.modules.get(type(bpf_object).__module__.split(".")[0])
    return getattr(module, "lib", None)


def bcc_table_names(bpf_object):
    """Every table the module declares, used by the code or not: the caller
    may fill a map no instruction names (a filter the compiler dropped)."""
    lib = _bcc_lib(bpf_object)
    if lib is None or not hasattr(bpf_object, "module"):
        raise Unsupported("the tables of this BPF object cannot be listed: pass map_names")
    # Private handles on the same (already loaded) library: bcc's own ctypes
    # prototypes stay as bcc set them.
    own = ctypes.CDLL(lib._name)
    own.bpf_num_tables.restype = ctypes.c_size_t
    own.bpf_num_tables.argtypes = [ctypes.c_void_p]
    own.bpf_table_name.restype = ctypes.c_char_p
    own.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return [own.bpf_table_name(bpf_object.module, i).decode() for i in range(own.bpf_num_tables(bpf_object.module))]


def capture(bpf_object, function_names, map_names=None, raw=()):
    """What the kernel needs to load bpf_object's functions again, bcc gone
    (those named in raw as raw tracepoint programs).

    bpf_object is a bcc.BPF (not imported here: the caller has it); its
    maps are described by the kernel (BPF_OBJ_GET_INFO_BY_FD on each fd), its
    functions' bytecode comes from dump_func(). Call it before cleanup()."""
    if map_names is None:
        map_names = bcc_table_names(bpf_object)
    maps, fd_names = [], {}
    for name in map_names:
        fd = bpf_object[name.encode()].map_fd
        info = map_info(fd)
        if info.type not in MAP_TYPES:
            raise Unsupported(f"map {name} is of type {info.type}, which the BPF loader does not create")
        maps.append(MapSpec(name, info.type, info.key_size, info.value_size, info.max_entries, info.map_flags))
        fd_names[fd] = name
    programs = []
    for fname in function_names:
        name = fname.decode() if isinstance(fname, bytes) else fname
        try:
            code = bpf_object.dump_func(name.encode())
        except Exception as e:  # bcc raises a bare Exception for an unknown function
            raise Unsupported(f"the function {name} has no bytecode to keep ({e})") from None
        insns, relocs = relocations(code, fd_names)
        programs.append(ProgSpec(name, insns, relocs,
                                 BPF_PROG_TYPE_RAW_TRACEPOINT if name in raw else BPF_PROG_TYPE_TRACEPOINT))
    lib = _bcc_lib(bpf_object)
    license, kern_version = "GPL", 0
    if lib is not None and hasattr(bpf_object, "module"):
        license = (lib.bpf_module_license(bpf_object.module) or b"GPL").decode()
        kern_version = int(lib.bpf_module_kern_version(bpf_object.module))
    module = sys.modules.get(type(bpf_object).__module__.split(".")[0])
    origin = {"bcc": getattr(module, "__version__", "unknown"), "kernel": os.uname().release,
              "machine": platform.machine()}
    compiled = Compiled(maps, programs, license, kern_version, origin=origin)
    compiled.check()
    return compiled



class BccMap:
    """A bcc table through the byte-level map interface of bpfsys.Map, so
    the session reads and writes maps the same way on both paths."""

    def __init__(self, table):
        self.table = table
        self.key_size = ctypes.sizeof(table.Key)
        self.value_size = ctypes.sizeof(table.Leaf)

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



class BccProgram:
    """A program bcc compiled and loaded in this process (the runtime's
    Program interface): used where the loader cannot take over (per-CPU
    perf buffers, kernels before 5.8, machines it does not know)."""

    def __init__(self, bpf, build_mode, where, module):
        self.bpf = bpf
        self.build_mode = build_mode
        self.where = where
        self.bcc_version = getattr(module, "__version__", None) or "unknown"

    @property
    def origin(self):
        return f"bcc {self.bcc_version} from {self.where}; {self.build_mode} build"

    def map(self, name):
        return BccMap(self.bpf[name])

    def attach(self, tracefs_root, tracepoint, function, raw=False):
        if raw:
            self.bpf.attach_raw_tracepoint(tp=tracepoint.split(":", 1)[1].encode(), fn_name=function.encode())
        else:
            self.bpf.attach_tracepoint(tp=tracepoint, fn_name=function)

    def program_fds(self, functions):
        funcs = getattr(self.bpf, "funcs", {})
        fds = {name: getattr(funcs.get(name.encode()), "fd", None) for name in functions}
        return {name: fd for name, fd in fds.items() if fd is not None}

    def open_events(self, add, add_values, size, event_struct, use_ring, pages, batch_max, pending):
        """Events through libbpf's ring or perf buffer callbacks; returns
        poll(timeout_ms)."""
        events = self.bpf["events"]
        string_at = ctypes.string_at

        def on_sample(_ctx_or_cpu, data, length):
            add(string_at(data, length if length < size else size))
            # A negative return ends libbpf's ring loop (this sample is
            # consumed): batches stay bounded while the producer keeps up.
            return -1 if len(pending) >= batch_max else 0

        if use_ring:
            events.open_ring_buffer(on_sample)
            return self.bpf.ring_buffer_poll
        # Losses are counted by the program itself (tcptrace_stats); the
        # perf buffer's own count would add the same drops again, later.
        events.open_perf_buffer(on_sample, page_cnt=pages or 64, lost_cb=lambda count: None)
        return self.bpf.perf_buffer_poll

    def count_ready(self, ended_ns):
        return 0  # libbpf's buffers cannot be looked into without consuming them

    def fill(self):
        return None  # nor told how full they are

    def close(self):
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception:
                pass
            self.bpf = None


def build(text, release, what, functions, say=None, capture_it=True, raw=()):
    """Compile with bcc here; returns (BccProgram, Compiled or None). The
    Compiled is what the kernel was given, for the cache and the loader,
    None when it cannot be reproduced without bcc (say() tells why)."""
    module, where = find_bcc()
    bpf, mode = build_program(module, text, release, what, say)
    program = BccProgram(bpf, mode, where, module)
    if not capture_it:
        return program, None
    try:
        return program, capture(bpf, functions, raw=raw)
    except Unsupported as e:
        if say:
            say(f"not cached ({e}): running on bcc")
        return program, None


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


