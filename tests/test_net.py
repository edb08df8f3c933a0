"""Addresses and task names from raw kernel fields, through bounded caches."""

import socket

from hypothesis import given, strategies as st

from tcptrace import net, tcpstate


def test_addresses_of_both_families_and_of_none():
    v4 = socket.inet_pton(socket.AF_INET, "192.0.2.7") + bytes(12)
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    assert net.ADDRESS[net.AF_INET][v4] == net.address(net.AF_INET, v4) == "192.0.2.7"
    assert net.ADDRESS[net.AF_INET6][v6] == "2001:db8::7"
    assert net.ADDRESS[net.AF_INET6][v4] == "c000:207::"  # the same bytes read as the other family
    assert net.ADDRESS[99][v4] == "?" and net.ADDRESS[net.AF_INET][b"\x01"] == "?"


@given(st.binary(min_size=16, max_size=16), st.sampled_from([net.AF_INET, net.AF_INET6]))
def test_cached_address_is_what_inet_ntop_says(raw, family):
    length = 4 if family == net.AF_INET else 16
    assert net.ADDRESS[family][raw] == socket.inet_ntop(family, raw[:length])
    assert net.ADDRESS[family][raw] == socket.inet_ntop(family, raw[:length])  # and again, from the cache


def test_caches_stay_bounded():
    cache = net.ADDRESS[net.AF_INET]
    for i in range(net._CACHE_MAX + 10):
        assert cache[i.to_bytes(4, "big") + bytes(12)] == socket.inet_ntoa(i.to_bytes(4, "big"))
    assert len(cache) <= net._CACHE_MAX


def test_task_names_stop_at_the_first_nul_and_survive_bad_bytes():
    assert net.COMM[b"curl\0garbage\0\0\0\0"] == net.comm(b"curl\0garbage\0\0\0\0") == "curl"
    assert net.COMM[b"\xff\xfeab" + bytes(12)] == "\ufffd\ufffdab"


def test_unknown_numbers_print_as_numbers():
    assert net.IP_VERSION[net.AF_INET] == 4 and net.IP_VERSION[net.AF_INET6] == 6 and net.IP_VERSION[1] == 1
    assert net.IP_VERSION.get(1, 1) == 1
    assert tcpstate.NAME[tcpstate.CLOSE_WAIT] == tcpstate.name(8) == "CLOSE_WAIT"
    assert tcpstate.NAME[13] == tcpstate.name(13) == "13"
    assert 13 not in tcpstate.NAME  # a miss is not stored
