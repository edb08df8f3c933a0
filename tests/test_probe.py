"""tcptrace probe without root: decode, the kernel side's arithmetic (the
very C functions of probe.bpf.c, compiled by the host's C compiler),
histogram rendering, code generation for saved kernels, bad input."""

import io
import json
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from events import make_event
from helpers import must_run
from tcptrace import codegen, hist, layout, output, runtime, tracefs
from tcptrace.cli import cli
from tcptrace.spec import DecodeContext
from tcptrace.tools import probe

FORMATS = os.path.join(os.path.dirname(__file__), "data", "formats")
V4 = bytes([10, 0, 0, 1]) + bytes(12)
V4_PEER = bytes([10, 0, 0, 2]) + bytes(12)
CTX = DecodeContext()


def event(**fields):
    base = dict(ts_ns=1, pid=181, comm=b"iperf3", owner_known=1, family=2, lport=40000, rport=5201,
                saddr=V4, daddr=V4_PEER, cwnd=42, ssthresh=probe.INFINITE_SSTHRESH, srtt_us=57, snd_wnd=65483,
                rcv_wnd=65536, snd_nxt=1000, snd_una=400, ca_state=0)
    base.update(fields)
    return make_event(probe.SPEC, **base)


def test_decode_a_complete_event():
    assert probe.decode(event(), CTX)[:14] == (181, "iperf3", 4, "10.0.0.1", 40000, "10.0.0.2", 5201, 42, None,
                                               57, 65483, 65536, 600, "Open")


@pytest.mark.parametrize("fields,column,expected", [
    ({"ssthresh": 7}, "ssthresh", 7),
    ({"ssthresh": probe.INFINITE_SSTHRESH}, "ssthresh", None),
    ({"ssthresh": 0xFFFFFFFF}, "ssthresh", None),
    ({"ca_state": 4}, "ca_state", "Loss"),
    ({"ca_state": 0xFF}, "ca_state", None),  # CA_UNKNOWN: no cong_state_set seen
    ({"owner_known": 0}, "pid", None),
    # snd_nxt wrapped past 2^32, snd_una not yet.
    ({"snd_una": 0xFFFFFF00, "snd_nxt": 0x100}, "inflight", 0x200),
])
def test_decode_blanks_and_wrap(fields, column, expected):
    keys = [c.key for c in probe.COLUMNS]
    assert probe.decode(event(**fields), CTX)[keys.index(column)] == expected


@pytest.mark.parametrize("before,after,expected", [
    (100, 1100, 1000),
    (0xFFFFFFF0, 0x10, 0x20),
    (5, 5, 0),
])
def test_seq_diff_is_modulo_2_32(before, after, expected):
    assert probe.seq_diff(before, after) == expected


def test_decode_count_summary():
    key = make_event(probe.COUNT_KEY, saddr=V4, daddr=V4_PEER, family=2, lport=40000, rport=5201)
    value = make_event(probe.COUNT_VALUE, samples=4, bytes_acked=1_000_001, srtt_sum=400, first_ns=10**9,
                       last_ns=2 * 10**9, srtt_min=50, srtt_max=200, cwnd=30, ssthresh_min=probe.INFINITE_SSTHRESH,
                       pid=181, owner_known=1, comm=b"iperf3")
    assert probe.decode_count(key, value, CTX) == (4, "10.0.0.1", 40000, "10.0.0.2", 5201, 181, "iperf3", 50, 100,
                                                   200, 30, None, 1_000_001, 8.0)
    one = make_event(probe.COUNT_VALUE, samples=1, first_ns=5, last_ns=5)
    assert probe.decode_count(key, one, CTX)[-1] is None  # a single probe spans no time


# -- the C side's arithmetic, compiled from probe.bpf.c itself ------------------

def _c_function(source, name):
    match = re.search(r"static __always_inline \w+ %s\(.*?\n}\n" % name, source, re.S)
    assert match, name
    return match.group(0).replace("__always_inline ", "")


@pytest.fixture(scope="module")
def c_helpers(tmp_path_factory):
    """A program running probe.bpf.c's seq_advance, interval_due and
    log2_slot on each line of its input."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        if must_run():
            pytest.fail("no C compiler (cc) to run probe.bpf.c's arithmetic")
        pytest.skip("no C compiler (cc)")
    source = codegen.bpf_source("probe.bpf.c")
    text = "\n".join([
        "#include <stdio.h>",
        "typedef unsigned int u32; typedef int s32; typedef unsigned long long u64;",
        *(_c_function(source, name) for name in ("seq_advance", "interval_due", "log2_slot")),
        "int main(void) { char op; unsigned long long a, b, c;",
        "  while (scanf(\" %c %llu %llu %llu\", &op, &a, &b, &c) == 4) {",
        "    if (op == 's') printf(\"%u\\n\", seq_advance((u32)a, (u32)b));",
        "    else if (op == 'i') printf(\"%d\\n\", interval_due(a, b, c));",
        "    else printf(\"%u\\n\", log2_slot((u32)a)); }",
        "  return 0; }",
    ])
    path = tmp_path_factory.mktemp("probe")
    subprocess.run([compiler, "-O2", "-x", "c", "-o", str(path / "helpers"), "-"], input=text, text=True, check=True)

    def run(*lines):
        out = subprocess.run([str(path / "helpers")], input="".join(f"{op} {a} {b} {c}\n" for op, a, b, c in lines),
                             capture_output=True, text=True, check=True).stdout
        return [int(v) for v in out.split()]

    return run


@pytest.mark.parametrize("before,after,expected", [
    (1000, 1000, 0),
    (1000, 66536, 65536),
    (0xFFFFFF00, 0x100, 0x200),  # across the wrap
    (0xFFFFFFFF, 0, 1),
    (2000, 1000, 0),  # never backwards
])
def test_seq_advance_in_the_kernel_wraps(c_helpers, before, after, expected):
    assert c_helpers(("s", before, after, 0)) == [expected]


def test_interval_due(c_helpers):
    ms = 1_000_000
    assert c_helpers(("i", 0, 99 * ms, 100 * ms), ("i", 0, 100 * ms, 100 * ms), ("i", 5 * ms, 300 * ms, 100 * ms)) \
        == [0, 1, 1]


def test_log2_slot_matches_python(c_helpers):
    values = [0, 1, 2, 3, 4, 7, 8, 1000, 65535, 65536, 2**31, 2**32 - 1]
    assert c_helpers(*[("l", v, 0, 0) for v in values]) == [hist.slot(v) for v in values]


# -- histograms -------------------------------------------------------------

def test_buckets_from_slots():
    assert hist.buckets({}) == []
    assert hist.buckets({0: 2, 1: 1, 3: 5}) == [(0, 1, 3), (2, 3, 0), (4, 7, 5)]


GOLDEN = """\
     usecs               : count     distribution
         0 -> 1          : 0        |                                        |
         2 -> 3          : 0        |                                        |
         4 -> 7          : 0        |                                        |
         8 -> 15         : 1        |*                                       |
        16 -> 31         : 20       |********************                    |
        32 -> 63         : 40       |****************************************|
        64 -> 127        : 3        |***                                     |
"""


def test_render_like_bcc():
    assert hist.render(hist.buckets({4: 1, 5: 20, 6: 40, 7: 3}), "usecs") == GOLDEN


def _hists():
    return [((("raddr", "10.0.0.2"),), hist.buckets({4: 1, 5: 20})), ((("raddr", "10.0.0.3"),), hist.buckets({1: 2}))]


def test_table_histograms_with_labels():
    w = output.writer("table", io.StringIO(), probe.COLUMNS)
    w.histograms(_hists(), ("srtt_us", "usecs"), title="11:00:00")
    text = w.stream.getvalue()
    assert text.startswith("11:00:00\n\nraddr = 10.0.0.2\n     usecs ")
    assert "\nraddr = 10.0.0.3\n" in text and "        16 -> 31         : 20       |" in text


def test_json_histograms_one_object_each():
    w = output.writer("json", io.StringIO(), probe.COLUMNS, tool="probe")
    w.histograms(_hists(), ("srtt_us", "usecs"))
    objs = [json.loads(line) for line in w.stream.getvalue().splitlines()]
    assert [{k: o[k] for k in ("hist", "raddr", "buckets", "count")} for o in objs] == [
        {"hist": "srtt_us", "raddr": "10.0.0.2", "buckets": [[0, 1, 0], [2, 3, 0], [4, 7, 0], [8, 15, 1],
                                                               [16, 31, 20]], "count": 21},
        {"hist": "srtt_us", "raddr": "10.0.0.3", "buckets": [[0, 1, 2]], "count": 2},
    ]
    assert objs[0]["tool"] == "probe"


def test_csv_histograms_one_row_per_bucket():
    w = output.writer("csv", io.StringIO(), probe.COLUMNS)
    w.histograms(_hists(), ("cwnd", "segments"))
    lines = w.stream.getvalue().splitlines()
    assert lines[0] == "raddr,hist,low,high,count" and lines[-1] == "10.0.0.3,cwnd,0,1,2" and len(lines) == 7


@pytest.mark.parametrize("by,label", [(None, ()), ("raddr", (("raddr", "10.0.0.2"),)), ("rport", (("rport", 80),)),
                                      ("lport", (("lport", 80),))])
def test_hist_labels(by, label):
    assert probe._hist_label({"hist": "rtt", "by": by}, (V4_PEER, 2, 80), CTX) == label


# -- struct sync of what only probe has, code generation -------------------------

@pytest.mark.parametrize("struct_name,py_layout", [("count_value", probe.COUNT_VALUE), ("hist_key", probe.HIST_KEY)])
def test_kernel_structs_in_sync(struct_name, py_layout):
    c_layout = layout.Layout(layout.parse_c_struct(codegen.bpf_source("probe.bpf.c"), struct_name))
    assert c_layout.describe() == py_layout.describe() and c_layout.size == py_layout.size


def _plan(kernel, **tool):
    values = {"interval_ms": 100, "all": False, "hist": None, "by": None, **tool}
    count = values.pop("count", False)
    opts = runtime.RunOptions(tool=values, count=count, lports=(5201,))
    source = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    return runtime.plan(probe.SPEC, opts, source, release=kernel,
                        btf_offsets=lambda s, m: {"snd_una": (1784, 4)})


def test_codegen_6_18_keys_sockets_by_skaddr():
    text = _plan("6.18").text
    assert "#define HAS_TCP_PROBE_SKADDR 8" in text and "#define HAVE_TCP_CONG_STATE_SET 1" in text
    assert "#define PROBE_INTERVAL_NS 100000000" in text


def test_codegen_6_1_lacks_skaddr_and_learns_sockets_by_endpoints():
    plan = _plan("6.1")
    assert "#define HAS_TCP_PROBE_SKADDR" not in plan.text and "#define HAS_TCP_PROBE_SOCK_COOKIE 8" in plan.text
    assert "#define HAVE_TCP_CONG_STATE_SET 1" in plan.text and not plan.missing


def test_codegen_5_15_has_no_cong_state():
    plan = _plan("5.15")
    assert [tp.name for tp, _why in plan.missing] == ["tcp:tcp_cong_state_set"]


@pytest.mark.parametrize("tool,defines", [
    ({"hist": "cwnd", "by": "lport"}, {"PROBE_HIST": 1, "HIST_OF": 2, "HIST_BY": 3}),
    ({"hist": "rtt"}, {"PROBE_HIST": 1, "HIST_OF": 1, "HIST_BY": 0}),
    ({"all": True}, {"PROBE_ALL": 1}),
    ({"interval_ms": 1000}, {"PROBE_INTERVAL_NS": 10**9}),
    ({"count": True}, {"TCPTRACE_COUNT": 1, "OFF_TCP_SOCK_SND_UNA": 1784}),
])
def test_options_become_defines(tool, defines):
    text = _plan("6.18", **tool).text
    for name, value in defines.items():
        assert f"#define {name} {value}\n" in text


@pytest.mark.parametrize("args,message", [
    (["--hist", "srtt"], "Invalid value for '--hist'"),
    (["--interval-ms", "0"], "Invalid value for '--interval-ms'"),
    (["--interval-ms", "x"], "Invalid value for '--interval-ms'"),
    (["--by", "raddr"], "--by goes with --hist"),
    (["--by", "laddr", "--hist", "rtt"], "Invalid value for '--by'"),
])
def test_bad_input_is_a_usage_error(args, message):
    result = CliRunner().invoke(cli, ["probe", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
