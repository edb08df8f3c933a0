"""tcptrace doctor: will each subcommand run on this kernel, and if not, why.

It looks at what tcptrace depends on (privileges, tracefs, BTF, bcc, how
programs get built, the ring buffer) and at every tracepoint a registered
tool uses, then judges each subcommand and each of its columns with the
same code the tools run (codegen.resolve), so its verdict and the tools'
behaviour cannot drift apart. It works without bcc: bcc is looked up only
to report on it, and used only by --compile.

With --formats DIR it judges saved format files of another kernel instead
of this one; the checks of this machine are then left out.
"""

import os
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Optional

from . import btf, codegen, headers, runtime, tracefs
from .runtime.plan import RINGBUF_SINCE
from .errors import (
    EXIT_BUILD_FAILED,
    EXIT_KERNEL_TOO_OLD,
    EXIT_NO_BCC,
    EXIT_NO_TRACEFS,
    EXIT_OK,
    EXIT_PRIVILEGE,
    BccMissingError,
    BuildError,
    KernelTooOldError,
    PrivilegeError,
    TracefsError,
)
from .programs import PROGRAMS

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
# A check that fails stops every subcommand; the first failing one, in this
# order, gives the exit status.
BLOCKING = (("privileges", EXIT_PRIVILEGE), ("bcc", EXIT_NO_BCC), ("tracefs", EXIT_NO_TRACEFS))


@dataclass
class Check:
    name: str
    status: str  # ok, warn (tcptrace runs with less), fail (nothing runs), skip
    detail: str


@dataclass
class TracepointReport:
    name: str
    present: Optional[bool]  # None: tracefs could not be read
    detail: str
    used_by: list
    fields: list = field(default_factory=list)  # dicts: name, type, offset, size, signed


@dataclass
class ColumnReport:
    key: str
    header: str
    available: Optional[bool]  # None: cannot be known from here (BTF of saved formats)
    reason: str = ""


@dataclass
class CommandReport:
    name: str
    status: str  # ok, partial (some columns blank), unavailable, unknown
    reason: str = ""
    missing: list = field(default_factory=list)  # optional tracepoints absent, with why
    columns: list = field(default_factory=list)
    build: str = ""  # with --compile: the build mode, or why it failed


@dataclass
class Report:
    release: str
    source: str  # "running kernel" or the saved formats directory
    checks: list = field(default_factory=list)
    tracepoints: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    status: int = EXIT_OK

    def check(self, name):
        return next((c for c in self.checks if c.name == name), None)

    def command(self, name):
        return next((c for c in self.commands if c.name == name), None)

    def to_json(self):
        return asdict(self)


# -- requirements ---------------------------------------------------------------


def tracepoint_names(specs):
    """Every tracepoint a tool attaches to or a column names, in order."""
    names = []
    for spec in specs:
        for tp in spec.tracepoints:
            names.append(tp.name)
        for col in spec.columns:
            names += [r.split(".", 1)[0] for r in col.requires if ":" in r]
    return list(dict.fromkeys(names))


def btf_wanted(spec):
    """{struct: [members]}: the tool's BTF needs and those its columns name."""
    wanted = {s: list(m) for s, m in spec.btf.items()}
    for col in spec.columns:
        for req in col.requires:
            if ":" not in req and "." in req:
                struct, member = req.split(".", 1)
                wanted.setdefault(struct, [])
                if member not in wanted[struct]:
                    wanted[struct].append(member)
    return wanted


def btf_found(spec, btf_offsets):
    """{"struct.member": (offset, size)} found, or None without BTF."""
    found = {}
    for struct, members in btf_wanted(spec).items():
        offsets = btf_offsets(struct, members)
        if offsets is None:
            return None
        for member, where in offsets.items():
            found[f"{struct}.{member}"] = where
    return found


def _unmet(req, formats, missing, found, btf_known):
    """Why a column requirement is not met on this kernel; "" when it is."""
    if ":" in req:
        name, _, fname = req.partition(".")
        fmt = formats.get(name)
        if fmt is None:
            why = missing.get(name, "tracepoint absent")
            return f"{name} unavailable ({why})"
        if fname and not fmt.has(fname):
            return f"{name} has no field {fname}"
        return ""
    if not btf_known:
        return None
    if found is None:
        return f"no BTF ({btf.VMLINUX}) to find {req}"
    if req not in found:
        return f"the kernel's BTF has no {req}"
    return ""


def _hidden_note(source, name):
    return " (hidden by TCPTRACE_HIDE_TRACEPOINTS)" if name in getattr(source, "hidden", ()) else ""


def judge(spec, source, btf_offsets, btf_known=True):
    """One subcommand on one kernel: runs or not, and which columns go blank."""
    report = CommandReport(spec.name, OK)
    try:
        formats, missing = codegen.resolve(spec, source)
    except KernelTooOldError as e:
        report.status = "unavailable"
        report.reason = str(e)
        return report
    absent = {tp.name: why + _hidden_note(source, tp.name) for tp, why in missing}
    # Column requirements may name optional tracepoints the tool does not
    # attach to; load them too, so a column can depend on any of them.
    for col in spec.columns:
        for req in col.requires:
            name = req.split(".", 1)[0]
            if ":" in req and name not in formats and name not in absent:
                fmt = source.load(name)
                if fmt is None:
                    absent[name] = "tracepoint absent" + _hidden_note(source, name)
                else:
                    formats[name] = fmt
    found = btf_found(spec, btf_offsets) if btf_known else None
    declared = set()
    for col in spec.columns:
        reasons = [_unmet(req, formats, absent, found, btf_known) for req in col.requires]
        declared.update(r.split(".", 1)[0] for r in col.requires)
        if any(r is None for r in reasons):
            report.columns.append(ColumnReport(col.key, col.header, None, "BTF of the saved kernel is unknown"))
        elif any(reasons):
            report.columns.append(ColumnReport(col.key, col.header, False, "; ".join(r for r in reasons if r)))
        else:
            report.columns.append(ColumnReport(col.key, col.header, True))
    for name, why in absent.items():
        note = "" if name in declared else ": the tool runs without it (no column names it in requires)"
        report.missing.append(f"{name} {why}{note}")
    for tp in spec.tracepoints:  # a stand-in says what it shows instead
        if getattr(tp, "instead_of", ()) and tp.why and tp.name in formats and any(n in absent for n in tp.instead_of):
            report.missing.append(f"{tp.name} stands in: {tp.why}")
    if btf_known and found is None and spec.btf:
        report.missing.append(f"no BTF ({btf.VMLINUX}): {', '.join(sorted(spec.btf))} offsets unknown")
    if report.missing or any(c.available is False for c in report.columns):
        report.status = "partial"
    return report


# -- this machine ---------------------------------------------------------------


def _privileges():
    try:
        runtime.check_privileges()
    except PrivilegeError as e:
        return Check("privileges", FAIL, str(e))
    from .runtime.priority import READER_NICE, can_raise, can_reserve

    who = "root" if os.geteuid() == 0 else "CAP_BPF and CAP_PERFMON"
    if can_reserve():
        return Check("privileges", OK, f"{who}; readers get CPU time reserved (SCHED_DEADLINE)")
    if can_raise():  # RLIMIT_NICE: a nice value, no reservation
        return Check("privileges", OK, f"{who}; readers run at nice {READER_NICE} (RLIMIT_NICE; "
                     "CAP_SYS_NICE would reserve them CPU time)")
    return Check("privileges", OK, f"{who}; no CAP_SYS_NICE: readers keep their priority, and a load that "
                 "keeps every CPU busy can starve them into losing events")


def _bcc():
    try:
        module, where = runtime.find_bcc()
    except BccMissingError as e:
        return Check("bcc", FAIL, str(e)), None
    version = getattr(module, "__version__", "unknown version")
    return Check("bcc", OK, f"bcc {version} from {where}"), module


def _tracefs():
    before = tracefs.find_mount()
    try:
        source = runtime.formats_source()
    except TracefsError as e:
        return Check("tracefs", FAIL, str(e)), None
    how = "mounted" if before else "mounted it now"
    return Check("tracefs", OK, f"{how} at {source.root}"), source


def _workload_note():
    """Where the event tools' cgroup and netns come from on this kernel
    (the socket's own, or the fallback) and where cgroup2 is mounted."""
    from . import workload

    found = {}
    for struct_name, members in workload.BTF.items():
        for member, where in (btf.kernel_offsets(struct_name, members) or {}).items():
            found[f"{struct_name}.{member}"] = where
    _defs, how = workload.mode(found)
    mount = workload.cgroup2_mount()
    where = f"cgroup2 at {mount[0]}" if mount else "no cgroup2 mount: --cgroup is refused, cgroup paths stay null"
    return f"; workload: {how}; {where}"


def _btf_check():
    if os.path.exists(btf.VMLINUX):
        return Check("btf", OK, f"{btf.VMLINUX}: struct offsets come from the running kernel" + _workload_note())
    return Check("btf", WARN, f"{btf.VMLINUX} is absent: columns read from kernel structs stay blank"
                 + _workload_note())


def _build_check(release, running):
    detail = "header-free: a generated header set (no kernel headers needed)"
    real = f"/lib/modules/{release}/build"
    if running and os.path.isdir(real):
        detail += f"; falls back to the kernel headers at {real}"
    elif running:
        detail += f"; no kernel headers at {real} to fall back on"
    return Check("build", OK, detail)


def _ringbuf_check(release):
    if headers.version_triple(release) >= RINGBUF_SINCE:
        return Check("ring buffer", OK, "BPF ring buffer (Linux 5.8+): one ordered stream")
    return Check("ring buffer", WARN, "no BPF ring buffer before Linux 5.8: per-CPU perf buffers are used")


# -- the report -----------------------------------------------------------------


def _tracepoint_reports(specs, source):
    out = []
    for name in tracepoint_names(specs):
        users = []
        for spec in specs:
            tp = next((t for t in spec.tracepoints if t.name == name), None)
            if tp is not None:
                users.append(spec.name + (" (optional)" if tp.optional else ""))
            elif any(r.split(".", 1)[0] == name for c in spec.columns for r in c.requires):
                users.append(spec.name + " (columns)")
        fmt = source.load(name) if source else None
        if source is None:
            out.append(TracepointReport(name, None, "unknown: tracefs unreadable", users))
            continue
        if fmt is None:
            out.append(TracepointReport(name, False, "absent" + _hidden_note(source, name), users))
            continue
        fields = [
            dict(name=f.name, type=f.ctype, offset=f.offset, size=f.size, signed=f.signed, array=f.array)
            for f in fmt.fields if not f.name.startswith("common_")
        ]
        out.append(TracepointReport(name, True, "present", users, fields))
    return out


def _compile(report, specs, source, bcc, release, btf_offsets):
    for spec in specs:
        command = report.command(spec.name)
        if command.status not in (OK, "partial"):
            continue
        opts = runtime.RunOptions(buffer="ring" if headers.version_triple(release) >= RINGBUF_SINCE else "perf")
        try:
            plan = runtime.plan(spec, opts, source, release=release, btf_offsets=btf_offsets)
            bpf, mode = runtime.build_program(bcc, plan.text, release, f"`tcptrace {spec.name}`")
        except BuildError as e:
            command.status = "unavailable"
            command.build = "failed"
            command.reason = str(e)
            continue
        try:
            bpf.cleanup()
        except Exception:
            pass
        command.build = mode


def _no_btf(_struct, _members):
    return None


def diagnose(formats_dir=None, compile_programs=False, specs=None):
    """The whole report. Nothing here raises for a missing dependency: each
    becomes a failed check and the exit status says which."""
    specs = list(specs if specs is not None else PROGRAMS.values())
    running = formats_dir is None
    bcc = None
    if running:
        release = os.uname().release
        report = Report(release, "running kernel")
        report.checks.append(Check("kernel", OK, f"Linux {release} {os.uname().machine}"))
        report.checks.append(_privileges())
        bcc_check, bcc = _bcc()
        report.checks.append(bcc_check)
        tracefs_check, source = _tracefs()
        report.checks.append(tracefs_check)
        report.checks.append(_btf_check())
        btf_offsets = btf.kernel_offsets
        btf_known = True
    else:
        source = runtime.formats_source(formats_dir)
        release = source.kernel_release()
        report = Report(release, formats_dir)
        report.checks.append(Check("kernel", OK, f"Linux {release}, from the saved formats in {formats_dir}"))
        if compile_programs:
            report.checks.append(_privileges())
            bcc_check, bcc = _bcc()
            report.checks.append(bcc_check)
        report.checks.append(Check("btf", SKIP, "not known for saved formats: BTF-fed columns are not judged"))
        btf_offsets = _no_btf
        btf_known = False
    report.checks.append(_build_check(release, running))
    report.checks.append(_ringbuf_check(release))
    report.tracepoints = _tracepoint_reports(specs, source)
    for spec in specs:
        if source is None:
            report.commands.append(CommandReport(spec.name, "unknown", "tracepoint formats unreadable (see tracefs)"))
        else:
            report.commands.append(judge(spec, source, btf_offsets, btf_known))
    if compile_programs:
        privileged = report.check("privileges").status == OK
        if bcc is not None and privileged and source is not None:
            _compile(report, specs, source, bcc, release, btf_offsets)
        else:
            report.checks.append(Check("compile", SKIP, "needs bcc and privileges (see above)"))
    report.status = exit_status(report)
    return report


def exit_status(report):
    for name, status in BLOCKING:
        check = report.check(name)
        if check is not None and check.status == FAIL:
            return status
    if any(c.status == "unavailable" and c.build == "failed" for c in report.commands):
        return EXIT_BUILD_FAILED
    if any(c.status in ("unavailable", "unknown") for c in report.commands):
        return EXIT_KERNEL_TOO_OLD
    return EXIT_OK


# -- rendering ------------------------------------------------------------------


def _wrap(text, width):
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or "-"


def _command_detail(command):
    parts = [command.reason] if command.reason else []
    by_reason = {}
    for col in command.columns:
        if col.available is False and col.header not in by_reason.setdefault(col.reason, []):
            by_reason[col.reason].append(col.header)
    parts += [f"{', '.join(names)} blank: {why}" for why, names in by_reason.items()]
    unjudged = list(dict.fromkeys(c.header for c in command.columns if c.available is None))
    if unjudged:
        parts.append(f"{', '.join(unjudged)}: need BTF, not judged for saved formats")
    explained = " ".join(by_reason)
    parts += [note for note in command.missing if note.split(" ", 1)[0] not in explained]
    if command.build and command.build != "failed":
        parts.append(f"compiled ({command.build} build)")
    return parts


WIDTH = 80


def _table(headers, rows):
    """A plain table whose last column, a list of paragraphs, is wrapped to
    what the other columns leave of WIDTH."""
    from tabulate import tabulate

    # tabulate pads each header by two and puts two spaces between columns.
    used = sum(
        max([len(h) + 2] + [len(line) for row in rows for line in str(row[i]).splitlines()])
        for i, h in enumerate(headers[:-1])
    ) + 2 * (len(headers) - 1)
    width = max(len(headers[-1]) + 2, WIDTH - used)
    body = [tuple(row[:-1]) + ("\n".join(_wrap(p, width) for p in row[-1]) or "-",) for row in rows]
    return tabulate(body, headers=headers, tablefmt="plain", disable_numparse=True)


def render_table(report):
    # The saved-formats directory is named in the kernel check below, where
    # a long path is wrapped; the title stays one short line.
    where = "running kernel" if report.source == "running kernel" else "saved formats"
    out = [f"tcptrace doctor: Linux {report.release} ({where})", ""]
    out.append(_table(("CHECK", "STATUS", "DETAIL"), [(c.name, c.status, [c.detail]) for c in report.checks]))
    out.append("")
    rows = []
    for tp in report.tracepoints:
        fields = " ".join(f["name"] for f in tp.fields) if tp.present else tp.detail
        here = {True: "yes", False: "no", None: "?"}[tp.present]
        rows.append((tp.name, here, _wrap(", ".join(tp.used_by), 16), [fields]))
    out.append(_table(("TRACEPOINT", "HERE", "USED BY", "FIELDS"), rows))
    out.append("")
    rows = [(c.name, c.status, _command_detail(c)) for c in report.commands]
    out.append(_table(("COMMAND", "STATUS", "DETAIL"), rows))
    out.append("")
    out.append(summary(report))
    return "\n".join(out) + "\n"


def summary(report):
    total = len(report.commands)
    down = [c.name for c in report.commands if c.status in ("unavailable", "unknown")]
    if report.status == EXIT_OK:
        partial = [c.name for c in report.commands if c.status == "partial"]
        tail = f" ({', '.join(partial)} with some columns blank)" if partial else ""
        return f"All {total} subcommands can run on this kernel{tail}."
    failed = [c for c in report.checks if c.status == FAIL]
    if failed:
        return f"No subcommand can run until this is fixed: {failed[0].detail}"
    return f"{len(down)} of {total} subcommands cannot run here: {', '.join(down)}."
