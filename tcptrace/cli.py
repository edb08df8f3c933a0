"""The command line: one click command per registered tool.

Options come from one vocabulary (OPTIONS), so a letter means the same thing
in every subcommand, and every value is validated here, before any BPF work.
"""

import os
import sys

import click

from . import __version__
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_STATUSES, TcptraceError
from .net import AF_INET, AF_INET6
from .output import FORMATS, silence_stdout
from .tools import TOOLS

MAX_LIST = 64  # entries of a -p/-L/-D list (the size of the filter maps)


def _int_list(value, name, low, high):
    if value is None:
        return ()
    items = [v.strip() for v in value.split(",")]
    if not value.strip() or any(not v for v in items):
        raise click.BadParameter(f"expected a comma-separated list of numbers, got {value!r}", param_hint=name)
    out = []
    for item in items:
        if not item.isdigit():
            raise click.BadParameter(f"{item!r} is not a number", param_hint=name)
        number = int(item)
        if not low <= number <= high:
            raise click.BadParameter(f"{number} is out of range {low}-{high}", param_hint=name)
        if number not in out:
            out.append(number)
    if len(out) > MAX_LIST:
        raise click.BadParameter(f"at most {MAX_LIST} values", param_hint=name)
    return tuple(out)


def _ports(ctx, param, value):
    return _int_list(value, "/".join(param.opts), 1, 65535)


def _pids(ctx, param, value):
    pids = _int_list(value, "/".join(param.opts), 1, 4194304)
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise click.BadParameter(f"no process has PID {pid}", param_hint="/".join(param.opts))
    return pids


def _pages(ctx, param, value):
    if value is not None and (value < 1 or value & (value - 1) or value > 65536):
        raise click.BadParameter(f"{value} is not a power of two from 1 to 65536", param_hint=param.opts[0])
    return value


class _Seconds(click.FloatRange):
    """A positive number of seconds; FloatRange alone lets "nan" through,
    which no comparison ever stops."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if value != value:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return value


POSITIVE_FLOAT = _Seconds(min=0, min_open=True, max=10**7)

# The shared vocabulary: bcc's letters where bcc's users know them, long
# names for the rest. A tool lists the names it takes in its spec.
OPTIONS = {
    "pid": click.option("-p", "--pid", "pid", metavar="PID[,PID...]", callback=_pids,
                        help="Only sockets owned by these processes (checked in the kernel)."),
    "localport": click.option("-L", "--localport", "lport", metavar="PORT[,PORT...]", callback=_ports,
                              help="Only these local ports (checked in the kernel)."),
    "remoteport": click.option("-D", "--remoteport", "rport", metavar="PORT[,PORT...]", callback=_ports,
                               help="Only these remote ports (checked in the kernel)."),
    "ipv4": click.option("-4", "--ipv4", is_flag=True, help="Only IPv4."),
    "ipv6": click.option("-6", "--ipv6", is_flag=True, help="Only IPv6."),
    "time": click.option("-T", "--time", "show_time", is_flag=True, help="Add a TIME column (HH:MM:SS)."),
    "timestamp": click.option("-t", "--timestamp", is_flag=True,
                              help="Add a TIME(s) column: seconds since the first event."),
    "wide": click.option("-w", "--wide", is_flag=True,
                         help="Wide address columns (39 characters, for IPv6) and an IP column."),
    "extended": click.option("-x", "--extended", is_flag=True, help="Add the extended columns (see below)."),
    "count": click.option("-c", "--count", is_flag=True,
                          help="Count in the kernel and print a summary instead of events."),
    "interval": click.option("-i", "--interval", type=POSITIVE_FLOAT, metavar="SECONDS",
                             help="With -c: print the summary every SECONDS too."),
    "top": click.option("--top", type=click.IntRange(min=1), metavar="N",
                        help="With -c: only the N busiest rows."),
    "failed": click.option("--failed", is_flag=True, help="Only failed attempts."),
}

COMMON = (
    click.option("-o", "--output", type=click.Choice(FORMATS), default="table", show_default=True,
                 help="Output format: an aligned table, CSV with a header row, or JSON Lines."),
    click.option("--duration", type=POSITIVE_FLOAT, metavar="SECONDS", help="Stop after SECONDS."),
    click.option("--max-events", type=click.IntRange(min=1), metavar="N", help="Stop after N rows."),
    click.option("--buffer", type=click.Choice(("auto", "ring", "perf")), default="auto", show_default=True,
                 help="Kernel-to-user buffer: a BPF ring buffer (Linux 5.8+) or per-CPU perf buffers."),
    click.option("--buffer-pages", type=int, callback=_pages, metavar="PAGES",
                 help="Buffer size in pages, a power of two (ring: 16384 in all, 64 MiB with 4 KiB "
                      "pages, to ride out bursts; perf: 64 per CPU)."),
    click.option("--verbose", is_flag=True, help="Report on stderr how the program was built and attached."),
    click.option("--ebpf", is_flag=True, hidden=True, help="Print the BPF program and exit (no root needed)."),
    click.option("--formats", "formats_dir", type=click.Path(exists=True, file_okay=False), hidden=True,
                 help="Read tracepoint formats from saved files instead of tracefs."),
)


def _epilog(spec):
    lines = ["\b", "Examples:"]
    width = max(len(e.command) for e in spec.examples) if spec.examples else 0
    for e in spec.examples:
        lines.append(f"  {e.command.ljust(width)}  # {e.what}")
    return "\n".join(lines)


def _options(kwargs, spec):
    from .runtime import RunOptions

    if kwargs.get("ipv4") and kwargs.get("ipv6"):
        raise click.UsageError("-4/--ipv4 and -6/--ipv6 exclude each other: give at most one.")
    if kwargs.get("interval") and not kwargs.get("count"):
        raise click.UsageError("-i/--interval goes with -c/--count.")
    if kwargs.get("top") and not kwargs.get("count"):
        raise click.UsageError("--top goes with -c/--count.")
    family = AF_INET if kwargs.get("ipv4") else AF_INET6 if kwargs.get("ipv6") else 0
    extra = {}
    if kwargs.get("failed"):
        extra["FILTER_FAILED"] = 1
    return RunOptions(
        output=kwargs["output"],
        wide=kwargs.get("wide", False),
        time=kwargs.get("show_time", False) or spec.always_time,
        timestamp=kwargs.get("timestamp", False),
        extended=kwargs.get("extended", False),
        family=family,
        pids=kwargs.get("pid") or (),
        lports=kwargs.get("lport") or (),
        rports=kwargs.get("rport") or (),
        duration=kwargs.get("duration") or 0.0,
        max_events=kwargs.get("max_events") or 0,
        buffer=kwargs["buffer"],
        buffer_pages=kwargs.get("buffer_pages") or 0,
        verbose=kwargs["verbose"],
        count=kwargs.get("count", False),
        interval=kwargs.get("interval") or 0.0,
        top=kwargs.get("top") or 0,
        extra=extra,
    )


def _fail(error):
    click.echo(f"tcptrace: {error}", err=True)
    sys.exit(error.exit_code)


def _print_program(spec, opts, formats_dir):
    from . import runtime

    source = runtime.formats_source(formats_dir)
    click.echo(runtime.plan(spec, opts, source).text, nl=False)


def make_command(spec):
    def callback(**kwargs):
        opts = _options(kwargs, spec)
        try:
            if kwargs["ebpf"]:
                _print_program(spec, opts, kwargs["formats_dir"])
                sys.exit(EXIT_OK)
            from . import output, runtime

            writer = output.writer(
                opts.output, sys.stdout, spec.columns, show_time=opts.time,
                show_timestamp=opts.timestamp, wide=opts.wide, extended=opts.extended, tool=spec.name,
            )
            status = runtime.run(spec, opts, writer)
        except TcptraceError as e:
            _fail(e)
        except BrokenPipeError:
            silence_stdout()
            status = EXIT_OK
        except KeyboardInterrupt:
            status = EXIT_OK
        except OSError as e:  # stdout on a full disk or a terminal that went away
            silence_stdout()
            _fail(TcptraceError(f"stopped: cannot write the output ({e.strerror or e})."))
        sys.exit(status)

    help_text = spec.description + ("\n\n" + spec.notes if spec.notes else "")
    command = click.Command(
        spec.name, callback=callback, help=help_text, short_help=spec.summary,
        epilog=_epilog(spec), context_settings={"help_option_names": ["-h", "--help"]},
    )
    decorators = [OPTIONS[name] for name in spec.options] + list(COMMON)
    for decorate in decorators:
        command = decorate(command)
    return command


def _status_epilog():
    lines = ["\b", "Exit status:"]
    lines += [f"  {code}  {what}" for code, what in EXIT_STATUSES]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_status_epilog())
@click.version_option(__version__, "-V", "--version", prog_name="tcptrace")
def cli():
    """Trace the kernel's TCP stack through its stable tracepoints."""


for _spec in TOOLS.values():
    cli.add_command(make_command(_spec))


def main():
    try:
        cli(prog_name="tcptrace")
    except BrokenPipeError:
        silence_stdout()
        sys.exit(EXIT_OK)
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except Exception as e:  # a bug: one line, not a traceback, unless asked
        if os.environ.get("TCPTRACE_DEBUG"):
            raise
        click.echo(f"tcptrace: internal error: {e.__class__.__name__}: {e} (set TCPTRACE_DEBUG=1 for details)",
                   err=True)
        sys.exit(EXIT_FAILURE)


def _add_doctor():
    from .doctor import command

    cli.add_command(command)


_add_doctor()


def _add_exporter():
    from .exporter import make_command as exporter_command

    cli.add_command(exporter_command(OPTIONS))


_add_exporter()
