"""The runtime: from a tool's spec and options to rows, through the kernel.

    plan      options + formats + BTF -> program text and map entries (pure)
    preflight privileges, tracefs, memlock: each missing piece named
    build     the chain to a Program: cache -> child build -> build here
    program   the Program interface; CachedProgram (bpfsys: no bcc)
    bcc       BccProgram, and the only `import bcc` of tcptrace
    session   open, loop, close
    losses    what was not printed, counted and named
    stopper   signals; ringbuf reads the ring in place; compiled and
              bpfsys keep and load programs without bcc
"""

from .bcc import BCC_DIRS, build_program, find_bcc
from .losses import STAT_LOST_OUTPUT, STAT_UNTRACKED
from .plan import Plan, RunOptions, plan, symbols_of
from .preflight import check_privileges, formats_source
from .session import Session, run
from .stopper import Stopper

__all__ = [
    "BCC_DIRS", "Plan", "RunOptions", "STAT_LOST_OUTPUT", "STAT_UNTRACKED", "Session", "Stopper",
    "build_program", "check_privileges", "find_bcc", "formats_source", "plan", "run", "symbols_of",
]
