"""Error types and the exit statuses they map to.

Every failure a user can meet ends in one sentence on stderr and one of these
statuses, so scripts can tell the causes apart. Usage errors are click's (2).
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOST_EVENTS = 3
EXIT_PRIVILEGE = 4
EXIT_NO_BCC = 5
EXIT_NO_TRACEFS = 6
EXIT_KERNEL_TOO_OLD = 7
EXIT_BUILD_FAILED = 8

EXIT_STATUSES = (
    (EXIT_OK, "success: the run ended and no event was lost"),
    (EXIT_FAILURE, "an unexpected failure (attaching, polling, writing output)"),
    (EXIT_USAGE, "bad command line: an invalid option or value"),
    (EXIT_LOST_EVENTS, "the run ended but events were lost (counts on stderr)"),
    (EXIT_PRIVILEGE, "not root and without the capabilities it needs (CAP_BPF, CAP_PERFMON, "
                     "CAP_DAC_READ_SEARCH), or a locked-memory limit too low (before Linux 5.11)"),
    (EXIT_NO_BCC, "bcc's Python module is missing or broken"),
    (EXIT_NO_TRACEFS, "tracefs is not mounted, or not readable by this process"),
    (EXIT_KERNEL_TOO_OLD, "a required tracepoint or tracepoint field is missing"),
    (EXIT_BUILD_FAILED, "the BPF program failed to compile, load or attach"),
)


class TcptraceError(Exception):
    """A failure the user can act on; its message is one sentence."""

    exit_code = EXIT_FAILURE


class PrivilegeError(TcptraceError):
    exit_code = EXIT_PRIVILEGE


class BccMissingError(TcptraceError):
    exit_code = EXIT_NO_BCC


class TracefsError(TcptraceError):
    exit_code = EXIT_NO_TRACEFS


class KernelTooOldError(TcptraceError):
    exit_code = EXIT_KERNEL_TOO_OLD


class BuildError(TcptraceError):
    exit_code = EXIT_BUILD_FAILED


class LoaderError(BuildError):
    """A compiled program could not be loaded or attached without bcc: use bcc instead."""


class VerifierError(LoaderError):
    """The kernel refused a program; .log is the verifier's whole log."""

    def __init__(self, message, log=""):
        super().__init__(message)
        self.log = log


class Unsupported(LoaderError):
    """The program uses something the loader cannot reproduce."""


class CacheError(TcptraceError):
    """A cache file that must not be used: unsafe ownership or mode, or unreadable."""
