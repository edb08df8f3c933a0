"""sd_notify by hand: datagrams received on a real AF_UNIX socket, at a path
and in the abstract namespace, and the watchdog interval from the environment."""

import os
import socket
import uuid

import pytest

from tcptrace import sdnotify


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    """(NOTIFY_SOCKET value, bound datagram socket), as systemd sets them up."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify")
        s.bind(name)
    else:
        name = "@tcptrace-test-" + uuid.uuid4().hex
        s.bind("\0" + name[1:])
    s.settimeout(5)
    yield name, s
    s.close()


@pytest.mark.parametrize("state", ["READY=1", "WATCHDOG=1", "STOPPING=1", "READY=1\nSTATUS=serving on 127.0.0.1:9464"])
def test_a_state_arrives_as_one_datagram(listener, state):
    name, s = listener
    assert sdnotify.notify(state, env={"NOTIFY_SOCKET": name}) is True
    assert s.recv(4096).decode() == state


def test_the_process_environment_is_read_by_default(listener, monkeypatch):
    name, s = listener
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert sdnotify.notify("READY=1")
    assert s.recv(4096) == b"READY=1"


@pytest.mark.parametrize("env", [
    {},
    {"NOTIFY_SOCKET": ""},
    {"NOTIFY_SOCKET": "vsock:2:1234"},
    {"NOTIFY_SOCKET": "/nonexistent/notify"},
], ids=["unset", "empty", "vsock", "nobody-listens"])
def test_outside_systemd_nothing_is_sent_and_nothing_raised(env):
    assert sdnotify.notify("READY=1", env=env) is False


def test_a_socket_that_went_away_is_not_an_error(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.close()
    assert sdnotify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": str(tmp_path / "notify")}) is False


@pytest.mark.parametrize("env, seconds", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "self"}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # set for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env, seconds):
    env = {k: str(os.getpid()) if v == "self" else v for k, v in env.items()}
    assert sdnotify.watchdog_interval(env) == seconds
