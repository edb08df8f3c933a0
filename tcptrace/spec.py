"""How a tool is declared: its tracepoints, event, columns and examples.

A tool module builds one ToolSpec from these pieces and a pure decode()
function. Nothing here imports bcc or click.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

from .layout import Layout


@dataclass(frozen=True)
class Column:
    key: str  # JSON key and CSV header
    header: str  # table header
    width: int = 0  # table width; 0 for the last column (no padding)
    spec: str = ""  # format spec for the value in a table: "d", "x", ".3f", ...
    right: bool = False  # right-aligned in a table
    truncate: bool = False  # cut to width in a table (bcc's %-10.10s for COMM)
    wide: int = 0  # width under -w (addresses: 39)
    wide_only: bool = False  # shown only under -w (the IP column)
    extended: bool = False  # shown only under -x/--extended
    json: bool = True  # part of the JSON object (an "-" column such as '->' is not)
    table: bool = True  # part of the table
    # What the column needs beyond the tool's required tracepoints, so
    # `tcptrace doctor` can say which columns go blank on a kernel:
    # "cat:event" (an optional tracepoint), "cat:event.field" (a field of
    # one) or "struct.member" (a BTF struct member).
    requires: tuple = ()
    # The JSON type of the value (events schema): "integer", "number",
    # "string" or "boolean"; "" derives it from `spec` ("d"/"x" integer,
    # "f" number, else string).
    type: str = ""
    nullable: bool = False  # JSON null when the value is unknown
    constant: Optional[str] = None  # the same text on every row (states' "->"): set in the table's format
    # How the table's per-event path gets the value straight from the event,
    # without decode()'s row: a Python expression over the event's field
    # names, `ctx` (the DecodeContext), the shared conversions ADDRESS,
    # COMM, IP_VERSION and STATE, and the tool module's own names. It must
    # give what decode() puts in this column; where decode() gives a blank
    # (None), the row takes the careful path. A call whose only argument is
    # ctx is made once per batch. Every column a table shows declares one,
    # or that table has no fast path (tcptrace/output.py derives it).
    value: str = ""

    @property
    def json_type(self):
        if self.type:
            return self.type
        if self.spec.endswith(("d", "x")):
            return "integer"
        if self.spec.endswith(("f", "e", "g")):
            return "number"
        return "string"


@dataclass(frozen=True)
class Tracepoint:
    """A tracepoint a tool attaches to `on_<name>` and the fields it reads.

    `fields` entries are a field name or a tuple of alternatives (any one is
    enough: the program adapts with #if on the generated HAS_ macros).
    """

    name: str  # "sock:inet_sock_set_state"
    fields: tuple = ()
    # The first kernel that has it with these fields: from the one table
    # (tracepoints.py) unless given, and a test holds a given one to it.
    since: str = ""
    optional: bool = False  # the tool runs without it (a column goes blank)
    # A stand-in: attached only when one of these tracepoints is unavailable
    # (top's TX from tcp_probe before the send/receive tracepoints of 6.3),
    # and `why` is said on stderr then: what the tool shows instead.
    instead_of: tuple = ()
    why: str = ""
    # The BTF entries ("struct.member", as in the tool's btf) that let the
    # tool's program take this tracepoint raw: the arguments the kernel
    # passes (BPF_PROG_TYPE_RAW_TRACEPOINT), no record written first, which
    # for a frequent event is most of its cost. On a kernel whose BTF has
    # them the plan defines RAW_<EVENT> and on_<event> is built to take them;
    # otherwise it reads the record, as without this.
    raw: tuple = ()

    def __post_init__(self):
        if not self.since:
            from .tracepoints import since

            object.__setattr__(self, "since", since(self.name, self.fields))

    @property
    def event(self):
        return self.name.split(":", 1)[1]

    @property
    def function(self):
        return f"on_{self.event}"


@dataclass(frozen=True)
class Example:
    command: str
    what: str


@dataclass(frozen=True)
class Histogram:
    """log2 histograms kept in the kernel, in a BPF hash (per CPU or not)
    named `hist`: its key struct is `key`, whose last field is the u32 slot
    (0 for a value of 0, else floor(log2(value)) + 1), and its value a u64.
    What the key holds besides the slot tells the histograms apart."""

    key: Layout
    wanted: Callable  # the tool's option values -> whether this run keeps histograms
    unit: Callable  # the tool's option values -> (JSON name of the value, table unit: "usecs")
    # The tool's option values, key values without the slot, DecodeContext
    # -> ((JSON key, value), ...) naming one histogram; () when there is one.
    label: Callable
    labels: tuple = ()  # a Column for each JSON key label() may give (the schema's)


@dataclass(frozen=True)
class Counter:
    """What the kernel counts in maps, read and printed at exit and every
    -i: -c/--count's rows from a BPF hash named `counts` whose key struct
    is `key` and value a u64 (the COUNT column), or, with `value`, a struct
    of that layout; and optionally `histogram`, which the tool's options
    switch on instead."""

    key: Layout
    columns: tuple
    # key values tuple, DecodeContext -> row tuple (without COUNT); with
    # `value`: key values tuple, value values tuple, DecodeContext.
    decode: Callable
    value: Optional[Layout] = None
    count: str = ""  # with `value`: its field that is the COUNT column
    count_header: str = "COUNT"
    rank: str = ""  # the column key rows are ordered by, busiest first; "" for COUNT
    histogram: Optional[Histogram] = None
    # A tool that only counts (top): no -c, and -i and --top stand alone.
    always: bool = False
    # The kernel counts under a generation (a u32 in the array `generation`):
    # even ones in `counts`, odd ones in `counts_odd`. Each read advances it
    # and waits for an RCU grace period before taking the old hash, so no
    # program still writes what is read and cleared.
    generations: bool = False
    # What the tool makes of an interval's rows before they are ranked and
    # cut: (its option values, columns, rows, interval, DecodeContext) ->
    # (columns, rows), where interval is (start, seconds), start in seconds
    # of the wall clock. top regroups (--by) and adds interval keys here.
    finish: Optional[Callable] = None
    # The line above each interval's table, from the finished rows:
    # (rows, interval, DecodeContext) -> text; None: the time.
    title: Optional[Callable] = None
    # The tool's option values -> whether a table on a terminal is redrawn
    # in place every interval (top), instead of appended.
    redraw: Optional[Callable] = None
    top: int = 0  # rows shown without --top: what fits a terminal, else this (0: all)
    intervals: str = ""  # the dest of the tool's option: stop after that many intervals


@dataclass(frozen=True)
class Option:
    """An option of one tool, declared without click (the command layer
    makes the click option from it). Its value reaches the tool's
    configure() under `dest`, never the C source as text."""

    dest: str  # the keyword of the value
    flags: tuple  # ("--reason",) or ("-b", "--by")
    help: str
    metavar: str = ""
    choices: tuple = ()  # a fixed set of words, checked by click
    flag: bool = False  # a switch without a value
    multiple: bool = False  # repeatable: the value is a tuple
    default: object = None
    parse: Optional[Callable] = None  # text -> value; a ValueError is a usage error
    range: tuple = ()  # (lowest, highest) of an integer value
    goes_with: str = ""  # the dest of a shared option it needs ("count"): a usage error without it


class BadOption(ValueError):
    """A value of a tool's own option that the running kernel makes
    invalid (an unknown reason name): a usage error, exit 2, raised by
    configure() before anything is loaded."""

    def __init__(self, flag, message):
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class Settings:
    """What a tool's own options become in the kernel: integer #defines and
    entries of its maps (map name -> [(key bytes, value bytes)])."""

    defines: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    summary: str  # one line for the command list
    description: str  # the --help text
    bpf: str  # file under tcptrace/bpf/
    event: Layout
    columns: tuple
    decode: Callable  # event values tuple, DecodeContext -> row tuple or None
    tracepoints: tuple
    options: tuple  # names from the shared option vocabulary (cli.OPTIONS)
    examples: tuple = ()
    btf: dict = field(default_factory=dict)  # struct name -> members wanted
    counter: Optional[Counter] = None
    notes: str = ""  # extra --help text (what needs a kprobe, caveats)
    always_time: bool = False  # a TIME column without -T (bcc's tcpretrans always has one)
    # The tool's own options (Option), beside the shared names in `options`,
    # and what their values become: configure(values, symbols) -> Settings,
    # where values maps each Option.dest to its value and symbols is the
    # running kernel's "tracepoint.field" -> {number: name} tables.
    own_options: tuple = ()
    configure: Optional[Callable] = None
    # What the program leaves out on purpose and counts, said at exit when
    # not 0: (per-CPU array map, what its count is), e.g. drops' purges.
    hidden: tuple = ()

    def table_columns(self, wide=False, extended=False):
        return [
            c
            for c in self.columns
            if c.table and (wide or not c.wide_only) and (extended or not c.extended)
        ]


@dataclass
class DecodeContext:
    """What decode() may consult besides the event: the options, the
    running kernel's symbol tables and caches that live for the run."""

    wide: bool = False
    extended: bool = False
    symbols: dict = field(default_factory=dict)  # "tracepoint.field" -> {value: name}
    owners: object = None  # an OwnerResolver for sockets opened before tracing
    btf: dict = field(default_factory=dict)  # "struct.member" -> (offset, size) found
    workload: object = None  # a workload.Resolver: cgroup id -> path, container, pod
    tracepoints: tuple = ()  # the tracepoints the run attached to


# The tracepoint most tools read state changes from, with the fields they use.
STATE_CHANGES = Tracepoint(
    "sock:inet_sock_set_state",
    fields=("skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol",
            "saddr", "daddr", "saddr_v6", "daddr_v6"),
    since="4.16",
)

# The same tracepoint taken raw (Tracepoint.raw): the arguments of its
# prototype, TP_PROTO(const struct sock *sk, const int oldstate, const int
# newstate) (btf.PROTOTYPES), and what a program then reads of the socket
# itself; a tool adds RAW_STATE_CHANGE_BTF to its btf.
RAW_STATE_CHANGE_BTF = {"btf_trace_inet_sock_set_state": ("sk", "oldstate", "newstate"),
                        "sock": ("sk_protocol",), "sock_common": ("skc_num",)}
RAW_STATE_CHANGE = tuple(f"{s}.{m}" for s, members in RAW_STATE_CHANGE_BTF.items() for m in members)


# The endpoint columns most tools show, with bcc's widths: 15 characters, 39
# under -w for IPv6, where the IP column appears too.
IP_COLUMN = Column("family", "IP", 2, "d", wide_only=True, value="IP_VERSION[family]")
ENDPOINT_COLUMNS = (
    Column("laddr", "LADDR", 15, wide=39, value="ADDRESS[family][saddr]"),
    Column("lport", "LPORT", 5, "d", value="lport"),
    Column("raddr", "RADDR", 15, wide=39, value="ADDRESS[family][daddr]"),
    Column("rport", "RPORT", 5, "d", value="rport"),
)


# The socket's workload (tcptrace/bpf/workload.bpf.h): the two fields every
# event tool's event ends with, the struct members the kernel side reads, and
# the columns made from them (decode() puts workload.row()'s values in
# CGROUP_COLUMN's place and after its own columns). JSON and CSV always
# carry the keys; the table shows CGROUP with --show-cgroup.
WORKLOAD_FIELDS = [("cgroup_id", "u64"), ("netns", "u32")]
CGROUP_COLUMN = Column("cgroup_label", "CGROUP", 20, json=False, table=False, nullable=True,
                       value="CGROUPS(ctx)[cgroup_id][3]")
WORKLOAD_COLUMNS = (
    Column("cgroup_id", "CGROUP_ID", table=False, type="integer", nullable=True, value="cgroup_id or None"),
    Column("cgroup", "CGROUP_PATH", table=False, nullable=True, value="CGROUPS(ctx)[cgroup_id][0]"),
    Column("container", "CONTAINER", table=False, nullable=True, value="CGROUPS(ctx)[cgroup_id][1]"),
    Column("pod_uid", "POD_UID", table=False, nullable=True, value="CGROUPS(ctx)[cgroup_id][2]"),
    Column("netns", "NETNS", table=False, type="integer", nullable=True, value="netns or None"),
)


def with_workload_btf(wanted, *more):
    """A tool's BTF needs plus the workload's (workload.BTF) and any more
    sets of them (RAW_STATE_CHANGE_BTF)."""
    from .workload import BTF

    out = {s: list(m) for s, m in wanted.items()}
    for extra in more + (BTF,):
        for struct_name, members in extra.items():
            have = out.setdefault(struct_name, [])
            have += [m for m in members if m not in have]
    return out


def show_cgroup(columns):
    """The columns with CGROUP in the table (--show-cgroup)."""
    from dataclasses import replace

    return tuple(replace(c, table=True) if c is CGROUP_COLUMN else c for c in columns)
