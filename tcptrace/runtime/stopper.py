"""How a run ends on a signal without losing what a reader is taking."""

import contextlib
import signal
import time


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
