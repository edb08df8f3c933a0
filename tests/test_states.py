"""tcptrace states without the kernel: decoding and every output format."""

import io
import socket

from events import make_event
from helpers import unwrap
from tcptrace import output
from tcptrace.spec import DecodeContext
from tcptrace.tools import states

V4 = socket.inet_pton(socket.AF_INET, "10.1.2.3") + bytes(12)
V4R = socket.inet_pton(socket.AF_INET, "93.184.216.34") + bytes(12)
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
V6R = socket.inet_pton(socket.AF_INET6, "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe")


def event(**kw):
    base = dict(ts_ns=5_000_000_000, skaddr=0xFFFF9FD7E8192000, delta_ns=1_373_000, pid=22384,
                oldstate=2, newstate=1, family=2, lport=63446, rport=80, saddr=V4, daddr=V4R,
                comm=b"curl".ljust(16, b"\0"), cgroup_id=44, netns=4026531840)
    base.update(kw)
    return make_event(states.SPEC, **base)


def render(kind, events, **kw):
    stream = io.StringIO()
    w = output.writer(kind, stream, states.COLUMNS, **kw)
    w.header()
    for ev in events:
        w.row(ev[0], states.decode(ev, DecodeContext()))
    return stream.getvalue()


def test_decode_v4():
    row = states.decode(event(), DecodeContext())
    assert row == (None, "ffff9fd7e8192000", 22384, "curl", 4, "10.1.2.3", 63446, "93.184.216.34", 80,
                   "SYN_SENT", "->", "ESTABLISHED", 1.373, 44, None, None, None, 4026531840)


def test_decode_v6_unknown_state_and_unknown_delta():
    row = states.decode(event(family=10, saddr=V6, daddr=V6R, newstate=13, delta_ns=2**64 - 1),
                        DecodeContext())
    assert row[4:6] == (6, "2001:db8::1") and row[7] == "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe"
    assert row[11] == "13" and row[12] is None


def test_table_golden():
    text = render("table", [event(), event(oldstate=7, newstate=2, lport=0, delta_ns=0, pid=1,
                                           comm=b"averyveryverylongname\0"[:16])])
    assert text.splitlines() == [
        "SKADDR           C-PID C-COMM     LADDR           LPORT RADDR           RPORT OLDSTATE    -> NEWSTATE    MS",
        "ffff9fd7e8192000 22384 curl       10.1.2.3        63446 93.184.216.34   80    SYN_SENT    -> ESTABLISHED 1.373",
        "ffff9fd7e8192000 1     averyveryv 10.1.2.3        0     93.184.216.34   80    CLOSE       -> SYN_SENT    0.000",
    ]


def test_table_wide_and_blank_ms():
    text = render("table", [event(family=10, saddr=V6, daddr=V6R, delta_ns=2**64 - 1)], wide=True)
    header, row = text.splitlines()
    assert header.split() == ["SKADDR", "C-PID", "C-COMM", "IP", "LADDR", "LPORT", "RADDR", "RPORT",
                              "OLDSTATE", "->", "NEWSTATE", "MS"]
    assert row.split()[3:] == ["6", "2001:db8::1", "63446", "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", "80",
                               "SYN_SENT", "->", "ESTABLISHED", "-"]
    assert row.index("63446") == header.index("LPORT")  # 39-wide address columns keep alignment


def test_csv_golden():
    text = render("csv", [event(comm=b'a,"b"\0')])
    assert text.splitlines() == [
        "skaddr,pid,comm,family,laddr,lport,raddr,rport,oldstate,newstate,ms,cgroup_id,cgroup,container,pod_uid,netns",
        'ffff9fd7e8192000,22384,"a,""b""",4,10.1.2.3,63446,93.184.216.34,80,SYN_SENT,ESTABLISHED,1.373,44,,,,'
        '4026531840',
    ]


def test_json_golden():
    import json

    text = render("json", [event(delta_ns=2**64 - 1)])
    assert text.startswith('{"ts":"') and '"ts_mono":5.000000000,' in text  # the event's ts_ns, exact
    assert unwrap(json.loads(text)) == {
        "skaddr": "ffff9fd7e8192000", "pid": 22384, "comm": "curl", "family": 4, "laddr": "10.1.2.3",
        "lport": 63446, "raddr": "93.184.216.34", "rport": 80, "oldstate": "SYN_SENT",
        "newstate": "ESTABLISHED", "ms": None, "cgroup_id": 44, "cgroup": None, "container": None,
        "pod_uid": None, "netns": 4026531840,
    }


def test_time_columns():
    text = render("csv", [event(ts_ns=10**9), event(ts_ns=3 * 10**9 + 500_000)], show_time=True,
                  show_timestamp=True)
    lines = text.splitlines()
    assert lines[0].startswith("time,timestamp,skaddr")
    t1, s1 = lines[1].split(",")[:2]
    t2, s2 = lines[2].split(",")[:2]
    assert len(t1) == 8 and t1.count(":") == 2
    assert float(s1) == 0.0 and float(s2) == 2.0005
    table = render("table", [event(ts_ns=10**9)], show_timestamp=True).splitlines()
    assert table[0].startswith("TIME(s)   SKADDR") and table[1].startswith("0.000000  ffff")
