"""Format files: parsing the kernel's own description of tracepoint records."""

import os

import pytest

from tcptrace import codegen, tcpstate, tracefs

FORMATS = os.path.join(os.path.dirname(__file__), "data", "formats")


def load(kernel, tp):
    return tracefs.FormatSource(os.path.join(FORMATS, kernel)).load(tp)


def test_inet_sock_set_state_on_6_18():
    fmt = load("6.18", "sock:inet_sock_set_state")
    f = {x.name: x for x in fmt.fields}
    assert (f["skaddr"].offset, f["skaddr"].size, f["skaddr"].ctype) == (8, 8, "const void *")
    assert (f["protocol"].offset, f["protocol"].size) == (30, 2)
    assert (f["saddr_v6"].offset, f["saddr_v6"].array) == (40, 16)
    assert f["oldstate"].signed and not f["sport"].signed
    assert fmt.symbols["newstate"][12] == "TCP_NEW_SYN_RECV"
    assert fmt.symbols["protocol"][262] == "IPPROTO_MPTCP"


def test_send_reset_layouts_differ_between_kernels():
    old = load("6.1", "tcp:tcp_send_reset")
    new = load("6.18", "tcp:tcp_send_reset")
    assert old.has("sport") and old.has("saddr", 4) and not old.has("reason")
    assert not new.has("sport") and new.has("saddr", 28) and new.has("reason")
    # Symbolic keys (TCP_ESTABLISHED) have no number: only numeric tables are kept.
    assert "state" not in new.symbols
    assert new.symbols["reason"][1] == "NO_SOCKET"
    assert new.field("reason").ctype == "enum sk_rst_reason"


def test_retransmit_gains_err():
    assert not load("6.1", "tcp:tcp_retransmit_skb").has("err")
    assert load("6.18", "tcp:tcp_retransmit_skb").field("err").offset == 76


def test_expression_sized_array():
    fmt = load("6.18", "tcp:tcp_probe")
    saddr = fmt.field("saddr")
    assert saddr.size == 28
    assert saddr.array == 28 or saddr.array == -1


@pytest.mark.parametrize("kernel", sorted(d for d in os.listdir(FORMATS) if os.path.isdir(os.path.join(FORMATS, d))))
def test_every_saved_format_parses_and_lays_out(kernel):
    root = os.path.join(FORMATS, kernel)
    source = tracefs.FormatSource(root)
    count = 0
    for category in sorted(os.listdir(root)):
        cdir = os.path.join(root, category)
        if not os.path.isdir(cdir):
            continue
        for name in sorted(os.listdir(cdir)):
            if not name.endswith(".format"):
                continue
            fmt = source.load(f"{category}:{name[:-7]}")
            assert fmt is not None and fmt.fields
            lay = codegen.tp_layout(fmt)
            for field in fmt.fields:
                if field.offset >= 8 and not field.name.startswith("common_"):
                    assert lay.offsets[field.name] == field.offset, (fmt.name, field.name)
            count += 1
    assert count >= 5


def test_missing_tracepoint_and_hidden_seam(tmp_path):
    source = tracefs.FormatSource(os.path.join(FORMATS, "6.18"), hidden=["tcp:tcp_send_reset"])
    assert source.load("tcp:tcp_send_reset") is None
    assert source.load("tcp:no_such_event") is None
    assert source.load("tcp:tcp_receive_reset") is not None


def test_live_tracefs_layout(tmp_path):
    """The tracefs layout (events/<cat>/<name>/format) is read too."""
    src = os.path.join(FORMATS, "6.18", "sock", "inet_sock_set_state.format")
    dest = tmp_path / "events" / "sock" / "inet_sock_set_state"
    dest.mkdir(parents=True)
    (dest / "format").write_text(open(src).read())
    assert tracefs.FormatSource(str(tmp_path)).load("sock:inet_sock_set_state").id == 2287


def test_malformed_format_is_an_error():
    with pytest.raises(ValueError):
        tracefs.parse_format("name: x\nID: 1\nformat:\n\tgarbage\n")


def test_state_names_total():
    for n in range(1, 13):
        assert tcpstate.name(n) in tcpstate.NAMES.values()
    assert tcpstate.name(0) == "0" and tcpstate.name(13) == "13" and tcpstate.name(-1) == "-1"
    assert tcpstate.number("TCP_LISTEN") == 10 and tcpstate.number("syn_recv") == 3
    # The kernel's own table agrees with ours.
    fmt = load("6.18", "sock:inet_sock_set_state")
    for number, name in fmt.symbols["newstate"].items():
        assert "TCP_" + tcpstate.name(number) == name
