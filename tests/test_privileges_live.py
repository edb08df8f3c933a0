"""Least privilege: tcptrace run as a user other than root with exactly the
documented capabilities (Linux 5.8+: CAP_BPF, CAP_PERFMON and
CAP_DAC_READ_SEARCH, given as ambient capabilities by setpriv, as systemd's
AmbientCapabilities= does), each capability taken away named with its own
exit status, a cache no other user can feed programs or offsets into, the
memlock limit of kernels before 5.11, and the line that says tracing has
begun (root + BPF, except the pure tests at the end)."""

import json
import os
import re
import resource
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import ANNOUNCED, ROOT, Tracer, announced, free_port, session, tcptrace_cmd, unwrap
from tcptrace import btf, errors
from tcptrace.exporter import SPEC as EXPORTER
from tcptrace.runtime import preflight
from test_life_live import client_bytes, rows_between, server_bytes, sole
from test_states_live import CLIENT_FIRST, by_socket

NOBODY = 65534
THE_SET = ("bpf", "perfmon", "dac_read_search")
CAP_BITS = {"bpf": 39, "perfmon": 38, "dac_read_search": 2}


def as_user(caps=THE_SET, uid=NOBODY):
    """setpriv's arguments: this uid and group, no supplementary groups, and
    exactly these capabilities, ambient so that they survive the exec."""
    given = ",".join(["-all"] + ["+" + c for c in caps])
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps={given}",
            f"--ambient-caps={given}"]


@pytest.fixture
def user_cache(tmp_path):
    """A cache directory of uid 65534's own, found the way a user's is
    ($XDG_CACHE_HOME/tcptrace), and the environment that points there; HOME
    stays root's, as setpriv leaves it."""
    home = tmp_path / "xdg"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    # Empty is unset to tcptrace, and survives Tracer's merge with os.environ.
    env = dict(os.environ, TCPTRACE_CACHE_DIR="", CACHE_DIRECTORY="", XDG_CACHE_HOME=str(home))
    return home / "tcptrace", env


def process_status(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["Uid"].split()[1]), int(fields["CapEff"], 16)


def exactly(caps):
    return sum(1 << CAP_BITS[c] for c in caps)


def private(path, uid=NOBODY):
    st = os.stat(path)
    return st.st_uid == uid and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


# -- the set suffices ---------------------------------------------------------------


def test_states_as_a_user_with_only_the_set(bpf, user_cache):
    cache, env = user_cache
    sport, cport = free_port(), free_port()
    for run in ("built", "cached"):
        with Tracer("states", "-o", "json", "-L", f"{sport},{cport}", prefix=as_user(), env=env) as t:
            assert process_status(t.proc.pid) == (NOBODY, exactly(THE_SET))
            session("127.0.0.1", sport, cport, client_send=1000, server_send=2000)
            assert t.stop() == 0, t.stderr
        assert by_socket(t.json_rows(), sport, cport) == CLIENT_FIRST, (run, t.stderr)
        # The program went to the user's own cache, and the second run loaded it from there.
        assert ("compiled program from the cache" in t.stderr) == (run == "cached"), t.stderr
    [program] = [p for p in os.listdir(cache) if p.startswith("prog-")]
    assert private(cache) and private(cache / program)
    assert stat.S_IMODE(os.stat(cache / program).st_mode) == 0o600


def traced_life(env, sport, cport, sizes):
    with Tracer("life", "-o", "json", "-L", f"{sport},{cport}", prefix=as_user(), env=env) as t:
        server, client = session("127.0.0.1", sport, cport, client_send=sizes[0], server_send=sizes[1],
                                 half_close=True)
        assert t.stop() == 0, t.stderr
    rows = rows_between(t.json_rows(), sport, cport)
    return sole(rows, lport=cport), sole(rows, lport=sport), client, server


def test_life_as_a_user_with_only_the_set_and_offsets_no_one_else_wrote(bpf, user_cache):
    """Bytes at the offsets of this kernel's BTF, as uid 65534. Then the
    cached offsets are made another user's, with wrong numbers in them: they
    are not used, and the bytes are still right."""
    cache, env = user_cache
    sizes = (100_000, 5_000)
    sport, cport = free_port(), free_port()
    c, s, client, server = traced_life(env, sport, cport, sizes)
    assert (c["pid"], c["tx_bytes"], c["rx_bytes"]) == (client.pid, *client_bytes(*sizes))
    assert (s["pid"], s["tx_bytes"], s["rx_bytes"]) == (server.pid, *server_bytes(*sizes))

    offsets = [cache / name for name in os.listdir(cache) if name.startswith("btf-")]
    assert offsets and all(private(p) for p in offsets)
    for path in offsets:
        found = json.loads(path.read_text())
        path.write_text(json.dumps({member: [8, size] for member, (_off, size) in found.items()}))
        os.chown(path, 4242, 4242)
        os.chmod(path, 0o644)
    sport, cport = free_port(), free_port()
    c, s, _client, _server = traced_life(env, sport, cport, sizes)
    assert (c["tx_bytes"], c["rx_bytes"]) == client_bytes(*sizes)
    assert (s["tx_bytes"], s["rx_bytes"]) == server_bytes(*sizes)
    assert all(private(p) for p in offsets)  # replaced by the user's own


def test_exporter_as_a_user_with_only_the_set(bpf, user_cache):
    _cache, env = user_cache
    port, sport, cport = free_port(), free_port(), free_port()
    with Tracer("exporter", "--listen", f"127.0.0.1:{port}", "-L", str(sport), prefix=as_user(), env=env) as exp:
        assert process_status(exp.proc.pid) == (NOBODY, exactly(THE_SET))
        session("127.0.0.1", sport, cport)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        assert exp.stop() == 0, exp.stderr
    assert "tcptrace_up 1.0" in text
    assert f"tcptrace_programs_loaded {len(EXPORTER.tracepoints)}.0" in text
    # -L: the server side's changes only, the listener's included.
    for old, new in (("CLOSE", "LISTEN"), ("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")):
        assert f'tcptrace_tcp_state_transitions_total{{from="{old}",to="{new}"}} 1.0' in text, text


# -- each capability taken away --------------------------------------------------------


@pytest.mark.parametrize("tool", ["states", "life", "exporter"])
@pytest.mark.parametrize("taken, status, sentence", [
    ("bpf", errors.EXIT_PRIVILEGE, "this process lacks CAP_BPF."),
    ("perfmon", errors.EXIT_PRIVILEGE, "this process lacks CAP_PERFMON."),
    ("dac_read_search", errors.EXIT_NO_TRACEFS, "cannot search it: run tcptrace as root or give it "
                                                "CAP_DAC_READ_SEARCH."),
])
def test_each_capability_taken_away_is_named(bpf, user_cache, tool, taken, status, sentence):
    _cache, env = user_cache
    args = ["--listen", f"127.0.0.1:{free_port()}"] if tool == "exporter" else ["--duration", "5"]
    left = [c for c in THE_SET if c != taken]
    proc = subprocess.run([*as_user(left), *tcptrace_cmd(tool, *args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == status, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("tcptrace: ") and line.endswith(sentence), line
    assert proc.stdout == ""


# -- saying when tracing has begun -----------------------------------------------------


MODES = [
    ("states", ()), ("states", ("-o", "json")), ("life", ("-o", "csv")), ("retrans", ("-c",)),
    ("retrans", ("-c", "-i", "1", "-o", "json")), ("resets", ("-c", "-o", "csv")), ("connect", ("-o", "json")),
    ("drops", ("-c",)),
]


@pytest.mark.parametrize("tool, args", MODES, ids=[" ".join((t,) + a) for t, a in MODES])
def test_the_line_that_says_tracing_has_begun(bpf, tool, args):
    """Once, on stderr, in every format and mode; -q silences it. A port
    nothing uses keeps the output empty: the line alone says the tool works."""
    unused = str(free_port())
    cmd = tcptrace_cmd(tool, *args, "-L", unused, "--duration", "1")
    loud = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert loud.returncode == 0, loud.stderr
    doing = "counting" if "-c" in args else "tracing"
    assert [line for line in loud.stderr.splitlines() if announced(line)] == loud.stderr.splitlines(), loud.stderr
    [line] = loud.stderr.splitlines()
    assert re.fullmatch(rf"tcptrace {tool}: {doing} TCP [^;]+ for 1 s; Ctrl-C to end", line), line
    quiet = subprocess.run(cmd + ["-q"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (quiet.returncode, quiet.stderr) == (0, "")
    assert ANNOUNCED.pattern.endswith("Ctrl-C to end$")
    if "json" in args:
        assert all(unwrap(json.loads(row), tool) is not None for row in loud.stdout.splitlines())


def test_the_exporter_says_where_it_serves_and_q_silences_it(bpf):
    port = free_port()
    with Tracer("exporter", "--listen", f"127.0.0.1:{port}") as exp:
        assert exp.stop() == 0
    assert f"tcptrace exporter: serving metrics on http://127.0.0.1:{port}/metrics; Ctrl-C to end\n" \
        in exp.stderr_lines
    port = free_port()
    quiet = subprocess.Popen(tcptrace_cmd("exporter", "--listen", f"127.0.0.1:{port}", "-q"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until it serves: the only sign of life it gives
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    assert r.status == 200
                break
            except OSError:
                assert quiet.poll() is None, quiet.communicate()
                time.sleep(0.1)
    finally:
        quiet.terminate()
        out, err = quiet.communicate(timeout=30)
    assert (quiet.returncode, out, err) == (0, "", "")


# -- without the kernel: the memlock limit and the cache's place and trust -----------


MiB = 1 << 20
INF = resource.RLIM_INFINITY


@pytest.mark.parametrize("version, limit, refused", [
    ((5, 10, 0), (64 << 10, 64 << 10), "is 64 KiB"),  # the default of many distributions
    ((5, 10, 0), (8 * MiB, 64 * MiB), "is 65536 KiB"),  # the hard limit is what a user cannot pass
    ((5, 4, 0), (64 << 10, INF), None),  # the soft one is raised to it
    ((5, 10, 0), (128 * MiB, 128 * MiB), None),
    ((5, 11, 0), (64 << 10, 64 << 10), None),  # memory charged to the cgroup from 5.11
    ((6, 18, 0), (0, 0), None),
])
def test_memlock_before_5_11(version, limit, refused):
    if refused is None:
        assert preflight.check_memlock(version, limit) is None
        return
    with pytest.raises(errors.PrivilegeError) as e:
        preflight.check_memlock(version, limit)
    assert e.value.exit_code == errors.EXIT_PRIVILEGE
    message = str(e.value)
    assert refused in message and "before 5.11" in message and "LimitMEMLOCK=infinity" in message
    assert ". " not in message and message.endswith(".")  # one sentence


def test_memlock_soft_limit_is_raised_to_the_hard_one():
    """In a child, whose limits may change: a hard limit (at most 256 MiB,
    what this machine has if lower) that suffices, and a soft one of 64 KiB."""
    script = (
        "import resource; from tcptrace.runtime import preflight\n"
        "hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]\n"
        "hard = 256 << 20 if hard == resource.RLIM_INFINITY else min(hard, 256 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, hard))\n"
        "preflight.MEMLOCK_NEEDED = min(preflight.MEMLOCK_NEEDED, hard)\n"
        "preflight.check_memlock((5, 10, 0))\n"
        "print(hard, *resource.getrlimit(resource.RLIMIT_MEMLOCK))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    hard, soft_after, hard_after = out.stdout.split()
    assert soft_after == hard_after == hard


def unknown_uid():
    """A uid no account has (its home is then nobody's business)."""
    import pwd

    uid = 4242
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def test_where_the_cache_lives():
    assert btf.cache_dir({"TCPTRACE_CACHE_DIR": "/srv/c", "CACHE_DIRECTORY": "/var/cache/x"}, 0) == "/srv/c"
    assert btf.cache_dir({"CACHE_DIRECTORY": "/var/cache/tcptrace:/var/cache/other"}, 0) == "/var/cache/tcptrace"
    assert btf.cache_dir({"HOME": "/root", "XDG_CACHE_HOME": "/root/.cache"}, 0) == "/var/cache/tcptrace"


@pytest.mark.skipif(os.geteuid() != 0, reason="a home of another user needs root to make")
def test_a_users_cache_is_in_a_directory_of_its_own(tmp_path):
    """$XDG_CACHE_HOME or ~/.cache when that directory is the user's own;
    setpriv and su keep root's HOME and XDG_CACHE_HOME, and those are not."""
    user = unknown_uid()
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, user, user)
    assert btf.cache_dir({"XDG_CACHE_HOME": str(home), "HOME": "/root"}, user) == str(home / "tcptrace")
    assert btf.cache_dir({"HOME": str(home)}, user) == str(home / ".cache" / "tcptrace")
    for env in ({"HOME": "/root"}, {"HOME": "/root", "XDG_CACHE_HOME": "/root/.cache"}, {}, {"HOME": "relative"}):
        assert btf.cache_dir(env, user) == f"/var/tmp/tcptrace-{user}"
    assert not os.path.exists(f"/var/tmp/tcptrace-{user}")  # made only by the user it is for


def vmlinux_offsets(monkeypatch, tmp_path):
    monkeypatch.setenv("TCPTRACE_CACHE_DIR", str(tmp_path / "cache"))
    members = ["bytes_acked", "bytes_received"]
    real = btf.kernel_offsets("tcp_sock", members, cache=False)
    assert btf.kernel_offsets("tcp_sock", members) == real
    [path] = (tmp_path / "cache").iterdir()
    return members, real, path


@pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="this kernel has no BTF")
@pytest.mark.parametrize("owner, mode, dir_mode, used", [
    ("me", 0o600, 0o700, True),
    ("me", 0o644, 0o755, True),
    ("me", 0o664, 0o700, False),  # its group may write it
    ("me", 0o606, 0o700, False),
    ("me", 0o600, 0o777, False),  # anyone may replace it
    ("me", 0o600, 0o1777, True),  # sticky, as /tmp: nobody can
    ("other", 0o600, 0o700, False),
])
def test_btf_offsets_others_could_have_written_are_not_used(monkeypatch, tmp_path, owner, mode, dir_mode, used):
    members, real, path = vmlinux_offsets(monkeypatch, tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    planted = {m: [8, size] for m, (_off, size) in real.items()}
    path.write_text(json.dumps(planted))
    if owner == "other":
        if os.geteuid() != 0:
            pytest.skip("another user's file needs root to make")
        os.chown(path, unknown_uid(), 0)
    os.chmod(path, mode)
    os.chmod(path.parent, dir_mode)
    found = btf.kernel_offsets("tcp_sock", members)
    assert found == ({m: tuple(v) for m, v in planted.items()} if used else real)


@pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="this kernel has no BTF")
@pytest.mark.parametrize("damage", ["[1, 2]", "{\"bytes_acked\": 8}", "{", "{\"bytes_acked\": [\"x\", 8]}"])
def test_damaged_btf_offsets_are_found_again(monkeypatch, tmp_path, damage):
    members, real, path = vmlinux_offsets(monkeypatch, tmp_path)
    path.write_text(damage)
    assert btf.kernel_offsets("tcp_sock", members) == real
    assert json.loads(path.read_text()) == {m: list(v) for m, v in real.items()}  # and written again


def test_a_symlinked_btf_offsets_file_is_not_followed(monkeypatch, tmp_path):
    if not os.path.exists(btf.VMLINUX):
        pytest.skip("this kernel has no BTF")
    members, real, path = vmlinux_offsets(monkeypatch, tmp_path)
    elsewhere = tmp_path / "planted.json"
    elsewhere.write_text(json.dumps({m: [8, size] for m, (_off, size) in real.items()}))
    path.unlink()
    path.symlink_to(elsewhere)
    assert btf.kernel_offsets("tcp_sock", members) == real
