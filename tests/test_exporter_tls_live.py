"""The real `tcptrace exporter --web-config` (root + BPF): its programs
attached, /metrics served over TLS with basic auth or client certificates,
/healthz open to probes, and systemd's notify protocol spoken to a socket
this test holds (READY=1 only once /metrics serves, WATCHDOG=1 while it
does, STOPPING=1 at the end). Certificates are made here with openssl."""

import http.client
import signal
import socket
import ssl
import subprocess
import threading
import time

import bcrypt
import pytest

from helpers import ROOT, Tracer, free_port, tcptrace_cmd
from tcptrace.exporter import SPEC
from test_webconfig import get, self_signed, signed_by

PASSWORD = "s3cret scrape"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("exporter-pki")
    self_signed("server", "/CN=tcptrace exporter", d, "-addext", "subjectAltName=IP:127.0.0.1")
    self_signed("ca", "/CN=tcptrace test CA", d)
    signed_by("ca", "client", "/CN=prometheus", d)
    return d


def trusting(pki, cert=None):
    ctx = ssl.create_default_context(cafile=str(pki / "server.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


class Notifications:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET: each
    message kept with the time it arrived, and a hook run on arrival."""

    def __init__(self, path, on_message=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = str(path)
        self.messages = []  # (monotonic time, text)
        self.on_message = on_message
        self.hook_results = []
        self.closing = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.closing:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            text = data.decode()
            self.messages.append((time.monotonic(), text))
            if self.on_message is not None:
                self.hook_results.append((text, self.on_message(text)))

    def states(self):
        return [text.split("\n")[0] for _t, text in self.messages]

    def close(self):
        self.closing = True
        self.thread.join(5)
        self.sock.close()


def scrape(port, pki, auth=("prometheus", PASSWORD)):
    return get(port, "/metrics", auth=auth, tls=trusting(pki))


def test_tls_basic_auth_and_systemd_notify(bpf, pki, tmp_path):
    (pki / "web-config.yml").write_text(
        f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: {HASH}\n")
    port = free_port()

    # The moment READY=1 arrives, /metrics must answer: scrape from the
    # receiving thread, before the test goes on.
    def on_message(text):
        return scrape(port, pki)[0] if text.startswith("READY=1") else None

    notify = Notifications(tmp_path / "notify", on_message)
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
    try:
        with Tracer("exporter", "--listen", f"127.0.0.1:{port}", "--web-config", str(pki / "web-config.yml"),
                    env=env) as exp:
            assert f"tcptrace exporter: serving metrics on https://127.0.0.1:{port}/metrics; Ctrl-C to end\n" \
                in exp.stderr_lines
            # Plain HTTP to the TLS port gets no HTTP answer at all.
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                get(port, "/metrics")
            assert scrape(port, pki, auth=None)[0] == 401
            status, headers, _ = scrape(port, pki, auth=("prometheus", "wrong"))
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
            assert scrape(port, pki, auth=("nobody", PASSWORD))[0] == 401
            status, _, body = scrape(port, pki)
            assert status == 200
            assert "tcptrace_up 1.0" in body and f"tcptrace_programs_loaded {len(SPEC.tracepoints)}.0" in body
            # /healthz: for probes, without credentials, telling nothing.
            status, _, body = get(port, "/healthz", tls=trusting(pki))
            assert (status, body) == (200, "ok\n")
            deadline = time.monotonic() + 10
            while notify.states().count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert exp.stop(sig=signal.SIGTERM) == 0, exp.stderr
        time.sleep(0.2)  # the last datagram may still be in the socket's queue
    finally:
        notify.close()
    states = notify.states()
    assert states[0] == "READY=1" and states[-1] == "STOPPING=1", states
    assert set(states[1:-1]) == {"WATCHDOG=1"} and len(states) - 2 >= 3, states
    assert notify.messages[0][1] == f"READY=1\nSTATUS=serving metrics on https://127.0.0.1:{port}/metrics"
    assert notify.hook_results[0] == ("READY=1\nSTATUS=serving metrics on "
                                      f"https://127.0.0.1:{port}/metrics", 200)
    pings = [t for t, text in notify.messages if text == "WATCHDOG=1"]
    # Half the interval systemd asked for, give or take the loop's 0.2 s.
    assert all(0.3 <= b - a <= 1.2 for a, b in zip(pings, pings[1:])), pings


def test_client_certificates(bpf, pki):
    (pki / "mtls.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n")
    port = free_port()
    with Tracer("exporter", "--listen", f"127.0.0.1:{port}", "--web-config", str(pki / "mtls.yml")) as exp:
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            get(port, "/metrics", tls=trusting(pki))
        status, _, body = get(port, "/metrics", tls=trusting(pki, "client"))
        assert status == 200 and "tcptrace_up 1.0" in body
        assert exp.stop(sig=signal.SIGTERM) == 0, exp.stderr


@pytest.mark.parametrize("text, sentence", [
    ("basic_auth_users:\n  prometheus: hunter2\n", "is not a bcrypt hash"),
    ("tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n", "cannot read cert_file"),
    ("tls_server_config: [\n", "is not valid YAML"),
])
def test_a_bad_web_config_stops_the_start_before_any_bpf_work(bpf, pki, text, sentence):
    path = pki / "bad.yml"
    path.write_text(text)
    port = free_port()
    proc = subprocess.run(tcptrace_cmd("exporter", "--listen", f"127.0.0.1:{port}", "--web-config", str(path),
                                       "--verbose"), capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()  # no build, attach or serving line: it stopped first
    assert line.startswith("tcptrace: ") and sentence in line, line
