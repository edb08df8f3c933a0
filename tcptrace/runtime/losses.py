"""Every event a run did not print is counted and named, never hidden.

Sources: what the programs could not hand over (tcptrace_stats: a ring
reservation or a count that could not be stored), what the kernel never
handed to them (a program already running on that CPU: recursion_misses,
5.12+), and what the run ended without printing (output abandoned at a
stop, the last drain running out of time). Each is counted here and said
once on stderr; any of them makes the exit status EXIT_LOST_EVENTS.
"""

import sys

from ..errors import EXIT_LOST_EVENTS, EXIT_OK
from .bpfsys import prog_recursion_misses

STAT_LOST_OUTPUT, STAT_UNTRACKED = 0, 1


class Losses:
    def __init__(self):
        self.lost = 0  # all of the below that never became a row
        self.reported = 0
        self.skipped = 0  # never handed to the program
        self.unprinted = 0  # handed over, not printed when the run ended
        self.abandoned = 0  # of those, rows whose output was abandoned at the stop
        self.untracked = 0  # sockets a per-socket map had no room for
        self.malformed = 0  # count keys decode() could not make sense of

    def read(self, program, functions):
        """Refresh from the kernel: the stats map and the programs' own counts."""
        try:
            table = program.map("tcptrace_stats")
            lost = table.sum(STAT_LOST_OUTPUT.to_bytes(4, sys.byteorder))
            self.untracked = table.sum(STAT_UNTRACKED.to_bytes(4, sys.byteorder))
        except (KeyError, OSError):
            return
        self.skipped = recursion_misses(program, functions)
        self.lost = lost + self.skipped + self.unprinted

    def add_unprinted(self, count):
        self.unprinted += count
        self.reported += count  # named by the final report, not as a buffer loss

    def report_new(self, say):
        if self.lost > self.reported:
            why = "the output buffer did not take them"
            if self.skipped:
                why += f", or the kernel skipped the program ({self.skipped} in all: it was already running on that CPU)"
            say(f"lost {self.lost - self.reported} events ({why}; {self.lost} in all)")
            self.reported = self.lost

    def report_final(self, say, stream=None):
        if self.unprinted:
            cut = (f" ({self.abandoned} of them in output abandoned at the stop, which may have taken some)"
                   if self.abandoned else "")
            say(f"{self.unprinted} events of the run were not printed when it ended{cut}")
        if self.lost:
            printed = f"; {stream.rows} printed" if stream else ""
            say(f"{self.lost} events lost in all{printed}")
        if self.untracked:
            say(f"{self.untracked} sockets were not tracked (a per-socket map was full, or another socket "
                "took its slot in the owners table)")
        if stream and stream.short:
            say(f"{stream.short} samples were shorter than the event and not decoded")
        malformed = self.malformed + (stream.malformed if stream else 0)
        if malformed:
            say(f"{malformed} samples could not be decoded")

    def status(self):
        return EXIT_LOST_EVENTS if self.lost else EXIT_OK


def recursion_misses(program, functions):
    """Events the kernel did not hand to the programs because one was
    already running on that CPU (a tracepoint hit again from an interrupt):
    lost as surely as a full buffer, but counted only in the programs' own
    statistics."""
    total = 0
    for fd in program.program_fds(functions).values():
        try:
            total += prog_recursion_misses(fd)
        except OSError:
            continue
    return total
