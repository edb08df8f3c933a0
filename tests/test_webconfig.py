"""--web-config: the exporter-toolkit file read and checked, and a real
HTTP(S) server on a loopback port honouring it (TLS, basic auth, client
certificates, /healthz). Certificates are made here with openssl."""

import base64
import http.client
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter

from helpers import ROOT
from tcptrace import webconfig
from tcptrace.errors import EXIT_USAGE
from tcptrace.webconfig import WebConfigError

PASSWORD = "correct horse"
# Cost 4, the lowest: the tests check the logic, not bcrypt's slowness.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
HASH_2Y = HASH.replace("$2b$", "$2y$", 1)  # as htpasswd -B writes it


def openssl(*args, cwd):
    if not shutil.which("openssl"):
        pytest.fail("openssl is not installed (Debian: apt-get install openssl)")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def new_key(name, cwd):
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=cwd)


def self_signed(name, subject, cwd, *extra):
    new_key(f"{name}.key", cwd)
    openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
            "-subj", subject, *extra, cwd=cwd)


def signed_by(ca, name, subject, cwd):
    new_key(f"{name}.key", cwd)
    openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=cwd)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """server.{crt,key} self-signed for 127.0.0.1; ca.crt signs client.crt;
    stranger.crt is a client certificate from another CA; enc.key is
    server.key under a passphrase; other.key belongs to no certificate."""
    d = tmp_path_factory.mktemp("pki")
    self_signed("server", "/CN=tcptrace test server", d, "-addext", "subjectAltName=IP:127.0.0.1")
    self_signed("ca", "/CN=tcptrace test CA", d)
    signed_by("ca", "client", "/CN=prometheus", d)
    self_signed("otherca", "/CN=another CA", d)
    signed_by("otherca", "stranger", "/CN=stranger", d)
    openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:x", "-out", "enc.key", cwd=d)
    new_key("other.key", d)
    (d / "empty.pem").write_text("")
    return d


def write_config(directory, text):
    path = directory / "web-config.yml"
    path.write_text(text)
    return path


@pytest.fixture
def serve(pki, monkeypatch, tmp_path):
    """Start a server on a free loopback port with a web config written in
    the pki directory (relative paths resolve there, whatever the cwd)."""
    servers = []
    monkeypatch.chdir(tmp_path)

    def start(text):
        config = webconfig.load(write_config(pki, text))
        registry = CollectorRegistry()
        Counter("tcptrace_test_scrapes", "A test counter.", registry=registry).inc(3)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = webconfig.MetricsServer(sock, registry, config).start()
        servers.append(server)
        return sock.getsockname()[1]

    yield start
    for server in servers:
        server.stop()


def client_context(pki, cert=None):
    ctx = ssl.create_default_context(cafile=str(pki / "server.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


def get(port, path="/metrics", auth=None, tls=None, header=None):
    """(status, headers, body) of one request; raises when the connection fails."""
    if tls is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    if header:
        headers["Authorization"] = header
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


TLS_AND_AUTH = f"""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
basic_auth_users:
  prometheus: {HASH}
  alice: {HASH_2Y}
"""


def test_plain_http_to_the_tls_port_gets_no_http_answer(serve):
    port = serve(TLS_AND_AUTH)
    with pytest.raises((http.client.HTTPException, OSError)):
        get(port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    assert not data.startswith(b"HTTP/") and b"tcptrace_test" not in data


@pytest.mark.parametrize("auth, header, status", [
    (None, None, 401),
    (("prometheus", "wrong"), None, 401),
    (("nobody", PASSWORD), None, 401),
    (("prometheus", ""), None, 401),
    (None, "Bearer " + PASSWORD, 401),
    (None, "Basic not-base64!", 401),
    (None, "Basic " + base64.b64encode(b"no colon").decode(), 401),
    (("prometheus", PASSWORD), None, 200),
    (("alice", PASSWORD), None, 200),  # a $2y$ hash, as htpasswd writes
])
def test_basic_auth_over_tls(serve, pki, auth, header, status):
    port = serve(TLS_AND_AUTH)
    got, headers, body = get(port, auth=auth, header=header, tls=client_context(pki))
    assert got == status
    if status == 401:
        assert headers["WWW-Authenticate"].startswith("Basic realm=")
        assert "tcptrace_test" not in body
    else:
        assert "tcptrace_test_scrapes_total 3.0" in body


def test_healthz_needs_no_credentials_and_says_nothing(serve, pki):
    port = serve(TLS_AND_AUTH)
    assert get(port, "/healthz", tls=client_context(pki)) [::2] == (200, "ok\n")
    status, _, body = get(port, "/", tls=client_context(pki), auth=("prometheus", PASSWORD))
    assert status == 404 and socket.gethostname() not in body


def test_basic_auth_without_tls_as_the_toolkit_allows(serve):
    port = serve(f"basic_auth_users:\n  prometheus: {HASH}\n")
    assert get(port)[0] == 401
    assert get(port, auth=("prometheus", PASSWORD))[0] == 200


def test_an_empty_file_serves_plain_http_without_auth(serve):
    port = serve("")
    assert get(port)[0] == 200


CLIENT_CERTS = """
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: {mode}
  client_ca_file: ca.crt
"""


@pytest.mark.parametrize("mode, cert, served", [
    ("RequireAndVerifyClientCert", "client", True),
    ("RequireAndVerifyClientCert", None, False),
    ("RequireAndVerifyClientCert", "stranger", False),
    ("VerifyClientCertIfGiven", "client", True),
    ("VerifyClientCertIfGiven", None, True),
    ("VerifyClientCertIfGiven", "stranger", False),
])
def test_client_certificates(serve, pki, mode, cert, served):
    port = serve(CLIENT_CERTS.format(mode=mode))
    tls = client_context(pki, cert)
    if served:
        assert get(port, tls=tls)[0] == 200
    else:
        # TLS 1.3 clients learn of the refusal at their first read, not in the handshake.
        with pytest.raises((ssl.SSLError, http.client.HTTPException, OSError)):
            get(port, tls=tls)


def test_tls_below_1_2_is_never_offered(pki):
    config = webconfig.load(write_config(pki, TLS_AND_AUTH))
    assert config.tls.minimum_version >= ssl.TLSVersion.TLSv1_2
    config = webconfig.load(write_config(pki, TLS_AND_AUTH.replace("key_file: server.key",
                                                                   "key_file: server.key\n  min_version: TLS13")))
    assert config.tls.minimum_version == ssl.TLSVersion.TLSv1_3


TLS = "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"

BAD = [
    ("tls_server_config: [unclosed", "is not valid YAML at line 1"),
    ("- a list\n", "must be a mapping"),
    ("tls_server_confg: {}\n", "unknown key 'tls_server_confg'"),
    (TLS.format(cert="server.crt", key="server.key") + "  cert_fiel: x\n", "unknown key 'cert_fiel'"),
    (TLS.format(cert="server.crt", key="server.key") + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     "cipher_suites is not supported"),
    ("rate_limit: {interval: 1s, burst: 2}\n", "rate_limit is not supported"),
    ("tls_server_config:\n  cert_file: server.crt\n", "needs both cert_file and key_file"),
    (TLS.format(cert="missing.crt", key="server.key"), "cannot read cert_file"),
    (TLS.format(cert="server.crt", key="other.key"), "is not the key of cert_file"),
    (TLS.format(cert="empty.pem", key="server.key"), "are not a PEM certificate and its key"),
    (TLS.format(cert="server.crt", key="enc.key"), "is encrypted"),
    ("basic_auth_users:\n  prometheus: hunter2\n", "the password of 'prometheus' is not a bcrypt hash"),
    ("basic_auth_users:\n  prometheus: '$2b$10$short'\n", "is not a bcrypt hash"),
    (f"basic_auth_users:\n  'a:b': {HASH}\n", "is not a user name"),
    (f"basic_auth_users:\n  123: {HASH}\n", "is not a user name"),
    (TLS.format(cert="server.crt", key="server.key") + "  client_auth_type: RequireAndVerifyClientCert\n",
     "needs client_ca_file"),
    (TLS.format(cert="server.crt", key="server.key") + "  client_auth_type: VerifyClientCertIfGiven\n",
     "needs client_ca_file"),
    (TLS.format(cert="server.crt", key="server.key") + "  client_ca_file: ca.crt\n",
     "client_ca_file is set but client_auth_type NoClientCert checks no client certificate"),
    (TLS.format(cert="server.crt", key="server.key") + "  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n",
     "RequireAnyClientCert"),
    (TLS.format(cert="server.crt", key="server.key") + "  client_auth_type: requireandverify\n",
     "is not one of"),
    (CLIENT_CERTS.format(mode="RequireAndVerifyClientCert").replace("ca.crt", "empty.pem"),
     "client_ca_file"),
    (TLS.format(cert="server.crt", key="server.key") + "  min_version: TLS11\n", "is not TLS12 or TLS13"),
    (TLS.format(cert="server.crt", key="server.key") + "  min_version: TLS13\n  max_version: TLS12\n",
     "max_version is below min_version"),
]


@pytest.mark.parametrize("text, sentence", BAD, ids=[s for _, s in BAD])
def test_each_bad_config_is_one_sentence(pki, text, sentence):
    with pytest.raises(WebConfigError) as e:
        webconfig.load(write_config(pki, text))
    message = str(e.value)
    assert sentence in message
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message
    assert e.value.exit_code == EXIT_USAGE


def test_an_unreadable_config_is_one_sentence(tmp_path):
    with pytest.raises(WebConfigError, match=r"^cannot read the web config .*nope.yml: No such file"):
        webconfig.load(tmp_path / "nope.yml")


@pytest.mark.parametrize("caps, error", [
    ("-all", "tls_server_config: cannot read key_file {key}: Permission denied."),
    ("-all,+dac_read_search", ""),
])
def test_a_key_only_root_can_read(pki, caps, error):
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    # The files are opened, not checked with os.access(): that asks about the
    # real uid, and would refuse what CAP_DAC_READ_SEARCH lets the exporter read.
    with tempfile.TemporaryDirectory() as d:  # pytest's own tmp dirs are root's alone
        os.chmod(d, 0o755)
        key, cert = os.path.join(d, "root-only.key"), os.path.join(d, "server.crt")
        shutil.copy(pki / "server.key", key)
        shutil.copy(pki / "server.crt", cert)
        os.chmod(key, 0o600)
        os.chmod(cert, 0o644)
        config = write_config(pathlib.Path(d), TLS.format(cert="server.crt", key="root-only.key"))
        os.chmod(config, 0o644)
        script = ("import sys; from tcptrace import webconfig\n"
                  "try: webconfig.load(sys.argv[1])\n"
                  "except webconfig.WebConfigError as e: print(e); sys.exit(e.exit_code)\n")
        out = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                              f"--inh-caps={caps}", f"--ambient-caps={caps}",
                              sys.executable, "-c", script, str(config)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == (EXIT_USAGE if error else 0), out.stderr
    assert out.stdout.strip() == error.format(key=key)


# -- the credential cache -------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def header(name, password):
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


def test_a_success_is_remembered_briefly_and_a_failure_never(monkeypatch):
    calls = []
    real = webconfig.bcrypt_check
    monkeypatch.setattr(webconfig, "bcrypt_check", lambda p, h: calls.append(p) or real(p, h))
    clock = Clock()
    auth = webconfig.BasicAuth({"prometheus": HASH.encode()}, clock=clock)
    right, wrong = header("prometheus", PASSWORD), header("prometheus", "wrong")
    assert auth.check(right) and auth.check(right)
    assert len(calls) == 1
    assert not auth.check(wrong) and not auth.check(wrong)
    assert len(calls) == 3
    clock.now += webconfig.AUTH_CACHE_SECONDS + 1
    assert auth.check(right)
    assert len(calls) == 4
    assert PASSWORD.encode() not in repr(auth.cache).encode()


def test_an_unknown_user_costs_a_bcrypt_check_too(monkeypatch):
    calls = []
    monkeypatch.setattr(webconfig, "bcrypt_check", lambda p, h: calls.append(h) or True)
    auth = webconfig.BasicAuth({"prometheus": HASH.encode()}, clock=Clock())
    assert not auth.check(header("nobody", PASSWORD))
    assert calls == [HASH.encode()]
