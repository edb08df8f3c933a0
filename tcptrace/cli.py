"""The command line: one click command per registered tool.

Options come from one vocabulary (OPTIONS), so a letter means the same thing
in every subcommand, and every value is validated here, before any BPF work.
"""

import json
import os
import sys

import click

from . import __version__, tools
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_STATUSES, TcptraceError
from .net import AF_INET, AF_INET6
from .output import FORMATS, silence_stdout
from .spec import BadOption

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


def _paths(parse_name, what):
    """A callback for a repeatable path option: each path parsed by
    workload.<parse_name> (a ValueError is a usage error), duplicates
    dropped, at most MAX_LIST."""

    def callback(ctx, param, value):
        from . import workload

        out = []
        for item in value or ():
            try:
                parsed = getattr(workload, parse_name)(item)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="/".join(param.opts))
            if parsed not in out:
                out.append(parsed)
        if len(out) > MAX_LIST:
            raise click.BadParameter(f"at most {MAX_LIST} {what}", param_hint="/".join(param.opts))
        return tuple(out)

    return callback


_cgroups = _paths("parse_cgroup", "cgroups")
_netns = _paths("parse_netns", "network namespaces")


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
    "cgroup": click.option("--cgroup", "cgroups", multiple=True, metavar="PATH", callback=_cgroups,
                           help="Only sockets of this cgroup v2 or any cgroup below it, also ones made later "
                                "(a directory of the cgroup2 mount, or its path as the cgroup key shows it; "
                                "repeatable; checked in the kernel)."),
    "netns": click.option("--netns", "netns", multiple=True, metavar="PATH", callback=_netns,
                          help="Only sockets of this network namespace (/run/netns/NAME, /proc/PID/ns/net; "
                               "repeatable; checked in the kernel)."),
    "show_cgroup": click.option("--show-cgroup", is_flag=True,
                                help="Add a CGROUP column: the socket's container (12 characters of its id), "
                                     "else its cgroup path, cut on the left."),
}
# What every event tool takes about the socket's workload (its event ends
# with spec.WORKLOAD_FIELDS).
WORKLOAD = ("cgroup", "netns", "show_cgroup")

# Every subcommand's run-time options (tools; the exporter and doctor take
# the ones that apply to them by name from OPTIONS).
OPTIONS.update({
    "output": click.option("-o", "--output", type=click.Choice(FORMATS), default="table", show_default=True,
                           help="Output format: an aligned table, CSV with a header row, or JSON Lines."),
    "duration": click.option("--duration", type=POSITIVE_FLOAT, metavar="SECONDS", help="Stop after SECONDS."),
    "max_events": click.option("--max-events", type=click.IntRange(min=1), metavar="N", help="Stop after N rows."),
    "buffer": click.option("--buffer", type=click.Choice(("auto", "ring", "perf")), default="auto",
                           show_default=True,
                           help="Kernel-to-user buffer: a BPF ring buffer (Linux 5.8+) or per-CPU perf buffers."),
    "buffer_pages": click.option("--buffer-pages", type=int, callback=_pages, metavar="PAGES",
                                 help="Buffer size in pages, a power of two (ring: 8 MiB per CPU, 8-64 MiB, at "
                                      "most 1/256 of the memory; perf: 64 per CPU)."),
    "quiet": click.option("-q", "--quiet", is_flag=True,
                          help="No line on stderr saying that tracing has begun."),
    "verbose": click.option("--verbose", is_flag=True,
                            help="Report on stderr how the program was built and attached."),
    "ebpf": click.option("--ebpf", is_flag=True, hidden=True,
                         help="Print the BPF program and exit (no root needed)."),
    "formats": click.option("--formats", "formats_dir", type=click.Path(exists=True, file_okay=False), hidden=True,
                            help="Read tracepoint formats from saved files instead of tracefs."),
})
COMMON = ("output", "duration", "max_events", "buffer", "buffer_pages", "quiet", "verbose", "ebpf", "formats")
# What the exporter takes besides its own options: it prints no rows.
SERVING = ("quiet", "verbose", "ebpf", "formats")


def _epilog(spec, extra=""):
    lines = ["\b", "Examples:"]
    width = max(len(e.command) for e in spec.examples) if spec.examples else 0
    for e in spec.examples:
        lines.append(f"  {e.command.ljust(width)}  # {e.what}")
    return "\n".join(lines) + extra


def own_option(option):
    """The click option of a spec.Option."""
    kwargs = {"help": option.help, "multiple": option.multiple}
    if option.flag:
        kwargs["is_flag"] = True
    else:
        kwargs["metavar"] = option.metavar or None
        if option.default is not None:
            kwargs.update(default=option.default, show_default=True)
        if option.choices:
            kwargs["type"] = click.Choice(option.choices)
        elif option.range:
            kwargs["type"] = click.IntRange(*option.range)
    if option.parse is not None:
        def callback(ctx, param, value, parse=option.parse):
            if value is None or value == ():
                return value
            try:
                return tuple(parse(v) for v in value) if option.multiple else parse(value)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="/".join(param.opts))
        kwargs["callback"] = callback
    return click.option(*option.flags, option.dest, **kwargs)


def _options(kwargs, spec):
    from .runtime import RunOptions

    if kwargs.get("ipv4") and kwargs.get("ipv6"):
        raise click.UsageError("-4/--ipv4 and -6/--ipv6 exclude each other: give at most one.")
    counts = bool(kwargs.get("count") or (spec.counter and spec.counter.always))  # top only counts
    # A tool's histograms (probe --hist) are reported like counts, -i and --top included.
    histogram = spec.counter.histogram if spec.counter else None
    hists = bool(histogram and histogram.wanted(kwargs))
    if kwargs.get("count") and hists:
        raise click.UsageError("-c/--count and --hist exclude each other: give one.")
    if kwargs.get("interval") and not (counts or hists):
        raise click.UsageError("-i/--interval goes with -c/--count" + (" or --hist." if histogram else "."))
    if kwargs.get("top") and not (counts or hists):
        raise click.UsageError("--top goes with -c/--count" + (" or --hist." if histogram else "."))
    ctx = click.get_current_context(silent=True)
    for option in spec.own_options:
        given = ctx is not None and ctx.get_parameter_source(option.dest) != click.core.ParameterSource.DEFAULT
        if option.goes_with and given and not kwargs.get(option.goes_with):
            needed = next(("/".join(p.opts) for p in ctx.command.params if p.name == option.goes_with),
                          option.goes_with)
            raise click.UsageError(f"{'/'.join(option.flags)} goes with {needed}.")
    family = AF_INET if kwargs.get("ipv4") else AF_INET6 if kwargs.get("ipv6") else 0
    extra = {}
    if kwargs.get("failed"):
        extra["FILTER_FAILED"] = 1
    return RunOptions(
        output=kwargs.get("output", "table"),
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
        buffer=kwargs.get("buffer", "auto"),
        buffer_pages=kwargs.get("buffer_pages") or 0,
        verbose=kwargs.get("verbose", False),
        quiet=kwargs.get("quiet", False),
        count=counts,
        interval=kwargs.get("interval") or 0.0,
        top=kwargs.get("top") or 0,
        extra=extra,
        tool={o.dest: kwargs.get(o.dest) for o in spec.own_options},
        cgroups=kwargs.get("cgroups") or (),
        netns=kwargs.get("netns") or (),
    )


def fail(error):
    click.echo(f"tcptrace: {error}", err=True)
    sys.exit(error.exit_code)


def guarded(work):
    """The one error wrapper of every subcommand: our errors end in one
    sentence and their exit status; a tool's option the running kernel
    refuses is a usage error (2); a closed pipe and Ctrl-C end quietly."""
    try:
        status = work()
    except BadOption as e:
        raise click.BadParameter(str(e), param_hint=e.flag)
    except TcptraceError as e:
        fail(e)
    except BrokenPipeError:
        silence_stdout()
        status = EXIT_OK
    except KeyboardInterrupt:
        status = EXIT_OK
    except OSError as e:  # stdout on a full disk or a terminal that went away
        silence_stdout()
        fail(TcptraceError(f"stopped: cannot write the output ({e.strerror or e})."))
    sys.exit(status)


def print_program(spec, opts, formats_dir):
    from . import runtime

    source = runtime.formats_source(formats_dir)
    click.echo(runtime.plan(spec, opts, source).text, nl=False)
    return EXIT_OK


def command(spec, names, run, epilog_extra=""):
    """A click command for spec: the shared options named, the tool's own,
    and run(opts, kwargs) -> exit status behind the one error wrapper."""

    def callback(**kwargs):
        opts = _options(kwargs, spec)
        if kwargs.get("ebpf"):
            guarded(lambda: print_program(spec, opts, kwargs.get("formats_dir")))
        guarded(lambda: run(opts, kwargs))

    help_text = spec.description + ("\n\n" + spec.notes if spec.notes else "")
    cmd = click.Command(
        spec.name, callback=callback, help=help_text, short_help=spec.summary,
        epilog=_epilog(spec, epilog_extra), context_settings={"help_option_names": ["-h", "--help"]},
    )
    decorators = [OPTIONS[name] for name in names] + [own_option(o) for o in spec.own_options]
    for decorate in decorators:
        cmd = decorate(cmd)
    cmd.vocabulary = tuple(names)  # the shared options it takes, by name
    return cmd


def make_command(spec):
    def run(opts, kwargs):
        from . import output, runtime
        from .spec import show_cgroup

        columns = show_cgroup(spec.columns) if kwargs.get("show_cgroup") else spec.columns
        writer = output.writer(
            opts.output, sys.stdout, columns, show_time=opts.time,
            show_timestamp=opts.timestamp, wide=opts.wide, extended=opts.extended, tool=spec.name,
        )
        return runtime.run(spec, opts, writer)

    workload = WORKLOAD if "cgroup_id" in spec.event.names else ()
    return command(spec, tuple(spec.options) + workload + COMMON, run)


def exporter_command():
    from . import exporter

    def run(opts, kwargs):
        return exporter.serve(kwargs["listen"], opts, kwargs.get("top_remotes") or 0)

    return command(exporter.SPEC, tuple(exporter.SPEC.options) + SERVING, run,
                   "\n\n" + exporter.metrics_help())


def _status_epilog():
    lines = ["\b", "Exit status:"]
    lines += [f"  {code}  {what}" for code, what in EXIT_STATUSES]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_status_epilog())
@click.version_option(__version__, "-V", "--version", prog_name="tcptrace")
def cli():
    """Trace the kernel's TCP stack through its stable tracepoints."""


class _Commands(dict):
    """The group's subcommands, each made when first asked for: a run of one
    declares (and imports) that one alone. Listing them makes them all."""

    def __init__(self, makers):
        super().__init__()
        self.makers = makers

    def __missing__(self, name):
        if name not in self.makers:
            raise KeyError(name)
        command = self[name] = self.makers[name]()
        return command

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __contains__(self, name):
        return name in self.makers or dict.__contains__(self, name)

    def __iter__(self):
        return iter(dict.fromkeys([*self.makers, *dict.keys(self)]))

    def __len__(self):
        return len(dict.fromkeys([*self.makers, *dict.keys(self)]))

    def _all(self):
        for name in self.makers:
            self[name]  # noqa: B018 (made on first use)
        return self

    def keys(self):
        return dict.keys(self._all())

    def values(self):
        return dict.values(self._all())

    def items(self):
        return dict.items(self._all())


cli.commands = _Commands({**{name: (lambda name=name: make_command(tools.spec(name))) for name in tools.NAMES},
                          "exporter": exporter_command})


@cli.command("doctor", short_help="Check what tcptrace needs and which subcommands and columns work here.",
             epilog="\b\nExamples:\n  tcptrace doctor             # a readable report; exit status 0 when all can run\n"
                    "  tcptrace doctor -o json     # the same report as one JSON object\n"
                    "  tcptrace doctor --compile   # also build every subcommand's program with bcc",
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", type=click.Choice(("table", "json")), default="table", show_default=True,
              help="A readable report, or the same as one JSON object.")
@click.option("--compile", "compile_programs", is_flag=True,
              help="Also compile every subcommand's BPF program with bcc (root; about half a second each).")
@OPTIONS["formats"]
def doctor(output, compile_programs, formats_dir):
    """Check the kernel and this machine for what tcptrace needs: privileges,
    tracefs, BTF, bcc, how programs are built, the ring buffer and every
    tracepoint the subcommands use. Then say, per subcommand and column,
    whether it works here and why not.

    Exit status: 0 when every subcommand can run, else the status of the
    first obstacle (see `tcptrace --help`)."""
    from . import doctor as checks

    def run():
        report = checks.diagnose(formats_dir, compile_programs)
        if output == "json":
            click.echo(json.dumps(report.to_json(), indent=2))
        else:
            click.echo(checks.render_table(report), nl=False)
        return report.status

    guarded(run)


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
