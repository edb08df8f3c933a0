"""The build chain: a Program from a Plan, cheapest way first.

1. The cache of compiled programs: this exact program text, built before on
   this kernel with this bcc, loaded without bcc (no LLVM in the process).
2. A build in a child process, which hands the program back captured: bcc
   and LLVM (about 110 MiB) are never mapped into this process, which may
   run for days.
3. A build here, with bcc, captured into the cache when it can be.
Per-CPU perf buffers (kernels before 5.8, --buffer perf), machines the
loader does not know and TCPTRACE_NO_CACHE stay with bcc throughout.
"""

import json
import os
import signal
import sys

from ..errors import CacheError, LoaderError
from . import bcc, bpfsys, compiled, ringbuf
from .program import CachedProgram


def cacheable(plan):
    return (plan.use_ring and bpfsys.supported() and ringbuf.supported()
            and not os.environ.get("TCPTRACE_NO_CACHE"))


def load(plan, what, functions, verbose, err=sys.stderr, raw=()):
    """The plan's program in the kernel (a Program); the functions in raw
    are raw tracepoint programs."""
    version = compiled.bcc_version(bcc.BCC_DIRS)
    path = None
    if cacheable(plan) and version:
        path = compiled.cache_path(plan.text, plan.release, version)
        saved = None
        try:
            saved = compiled.read_cache(path)
        except CacheError as e:
            verbose(f"{e}; building with bcc")
        if saved is not None:
            try:
                return CachedProgram(saved, "cached", version)
            except LoaderError as e:
                verbose(f"the cached program did not load ({e}); building with bcc")
    if path is not None and not os.environ.get("TCPTRACE_BUILD_HERE"):
        built = build_apart(plan.text, plan.release, what, functions, verbose, err, raw)
        if built is not None:
            saved, reply = built
            try:
                program = CachedProgram(saved, reply.get("mode", ""), reply.get("version") or version,
                                        reply.get("where", "-"), built_apart=True)
            except LoaderError as e:
                verbose(f"the program built apart did not load ({e}); building here")
            else:
                if not compiled.write_cache(path, saved):
                    verbose(f"the compiled program could not be cached in {os.path.dirname(path)}")
                return program
    program, saved = bcc.build(plan.text, plan.release, what, functions, verbose, capture_it=path is not None,
                               raw=raw)
    if saved is None:
        return program
    try:
        cached = CachedProgram(saved, program.build_mode, program.bcc_version, program.where)
    except LoaderError as e:
        verbose(f"not cached ({e}): running on bcc")
        return program
    if not compiled.write_cache(path, saved):
        verbose(f"the compiled program could not be cached in {os.path.dirname(path)}")
    program.close()
    return cached


def build_apart(text, release, what, functions, verbose, err=sys.stderr, raw=()):
    """Compile with bcc in a child process; returns (Compiled, the child's
    reply) or None when the child did not manage it: the caller builds
    here, and that build says why (the child's messages are dropped then,
    not shown twice)."""
    import tempfile

    try:
        log = tempfile.TemporaryFile()
        r, w = os.pipe()
    except OSError:
        return None
    for stream in (sys.stdout, sys.stderr, err):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    pid = os.fork()
    if pid == 0:  # the child: reports on the pipe, never returns
        status = 1
        try:
            os.close(r)
            os.dup2(log.fileno(), 2)  # bcc's, the compiler's and verbose() messages
            program, saved = bcc.build(text, release, what, functions, verbose, raw=raw)
            if saved is None:
                raise LoaderError("the program cannot be captured")
            reply = {"mode": program.build_mode, "where": program.where, "version": program.bcc_version,
                     "program": saved.to_json()}
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
            text_back = pipe.read()
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
    if status != 0 or not text_back:
        verbose("the build in a child process failed; building here")
        return None
    try:
        reply = json.loads(text_back)
        saved = compiled.Compiled.from_json(reply["program"])
    except (ValueError, KeyError, TypeError) as e:
        verbose(f"the child's build came back unusable ({e}); building here")
        return None
    if messages:
        err.write(messages)
        err.flush()
    return saved, reply
