"""The exporter's web config, and the HTTP(S) server that honours it.

The file is the one Prometheus' exporter-toolkit defines (what node_exporter
reads with --web.config.file), so operators reuse the files they have:

    tls_server_config:
      cert_file: server.crt            # relative paths: from the file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: clients-ca.crt
    basic_auth_users:
      prometheus: $2y$10$...           # bcrypt, e.g. htpasswd -nBC 10 "" | tr -d ':\\n'

load() reads and checks it all at start, before any BPF work: every problem is
a WebConfigError of one sentence (exit status 2). MetricsServer serves a
prometheus_client registry on /metrics, and /healthz without credentials, on
a socket the caller has already bound.
"""

import base64
import hashlib
import hmac
import os
import re
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .errors import EXIT_USAGE, TcptraceError

# The toolkit's names are Go's tls.ClientAuthType values; here each maps to
# (what Python's ssl does, whether a CA file is needed).
CLIENT_AUTH = {
    "NoClientCert": (ssl.CERT_NONE, False),
    # Go asks for a certificate and never checks it: it authenticates no one,
    # which is what not asking does too.
    "RequestClientCert": (ssl.CERT_NONE, False),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
# Toolkit keys this server cannot honour. Each weakens nothing when absent
# in the toolkit, so refusing is the safe reading of a file that sets one.
UNSUPPORTED = {
    "cert": "give the certificate as cert_file",
    "key": "give the key as key_file",
    "client_ca": "give the CA as client_ca_file",
    "client_allowed_sans": "Python's ssl module cannot match client SANs",
    "cipher_suites": "the ssl module's defaults for TLS 1.2+ apply",
    "curve_preferences": "the ssl module's defaults apply",
    "prefer_server_cipher_suites": "the ssl module's defaults apply",
    "rate_limit": "put a proxy in front for rate limits",
    "headers": "no custom response headers are served",
}
# $2a$, $2b$ and $2y$ are the same algorithm (htpasswd -B writes $2y$).
BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")

AUTH_CACHE_SECONDS = 60
AUTH_CACHE_SIZE = 64
IO_TIMEOUT = 10  # seconds a client gets for its TLS handshake and request


class WebConfigError(TcptraceError):
    """A web config tcptrace cannot serve with; its message is one sentence."""

    exit_code = EXIT_USAGE


@dataclass
class WebConfig:
    tls: ssl.SSLContext = None  # None: plain HTTP, as the toolkit does without tls_server_config
    users: dict = field(default_factory=dict)  # name -> bcrypt hash (bytes); empty: no basic auth
    client_auth: str = "NoClientCert"


def load(path):
    """The WebConfig of a file; raises WebConfigError."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise WebConfigError(f"cannot read the web config {path}: {_reason(e)}.") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "unparsable"
        raise WebConfigError(f"the web config {path} is not valid YAML{where}: {problem}.") from None
    if doc is None:
        doc = {}
    _mapping(doc, f"the web config {path}")
    _known(doc, TOP_KEYS, f"the web config {path}")

    http = doc.get("http_server_config") or {}
    _mapping(http, "http_server_config")
    # http2 changes nothing a scraper can rely on: HTTP/1.1 is always served.
    _known(http, {"http2"}, "http_server_config")

    base = os.path.dirname(os.path.abspath(path))
    config = WebConfig(users=_users(doc.get("basic_auth_users")))
    tls = doc.get("tls_server_config")
    if tls:
        _mapping(tls, "tls_server_config")
        _known(tls, TLS_KEYS, "tls_server_config")
        config.client_auth = tls.get("client_auth_type") or "NoClientCert"
        config.tls = _context(tls, base)
    return config


def _users(users):
    if not users:
        return {}
    _mapping(users, "basic_auth_users")
    out = {}
    for name, hashed in users.items():
        if not isinstance(name, str) or not name or ":" in name:
            raise WebConfigError(f"basic_auth_users: {name!r} is not a user name (a non-empty string without ':').")
        if not isinstance(hashed, str) or not BCRYPT.fullmatch(hashed):
            raise WebConfigError(
                f"basic_auth_users: the password of {name!r} is not a bcrypt hash "
                "(make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')."
            )
        out[name] = hashed.encode()
    return out


def _context(tls, base):
    def path_of(key):
        value = tls.get(key)
        if not value:
            return None
        if not isinstance(value, str):
            raise WebConfigError(f"tls_server_config: {key} must be a file name.")
        path = os.path.join(base, value)  # an absolute value stays as it is
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise WebConfigError(f"tls_server_config: cannot read {key} {path}: {_reason(e)}.") from None
        return path

    cert, key, ca = path_of("cert_file"), path_of("key_file"), path_of("client_ca_file")
    if not cert or not key:
        raise WebConfigError("tls_server_config needs both cert_file and key_file.")
    auth = tls.get("client_auth_type") or "NoClientCert"
    if auth == "RequireAnyClientCert":
        raise WebConfigError("tls_server_config: client_auth_type RequireAnyClientCert (any certificate, unchecked) "
                             "is not supported: use RequireAndVerifyClientCert with client_ca_file.")
    if auth not in CLIENT_AUTH:
        raise WebConfigError(f"tls_server_config: client_auth_type {auth!r} is not one of "
                             f"{', '.join(CLIENT_AUTH)}.")
    mode, needs_ca = CLIENT_AUTH[auth]
    if needs_ca and not ca:
        raise WebConfigError(f"tls_server_config: client_auth_type {auth} needs client_ca_file to check certificates with.")
    if ca and not needs_ca:
        # The toolkit refuses this too: a CA given but never used looks like
        # client authentication while it lets everyone in.
        raise WebConfigError(f"tls_server_config: client_ca_file is set but client_auth_type {auth} checks no "
                             "client certificate: use RequireAndVerifyClientCert.")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for bound in ("min_version", "max_version"):
        name = tls.get(bound)
        if name is None:
            continue
        if name not in TLS_VERSIONS:
            raise WebConfigError(f"tls_server_config: {bound} {name!r} is not TLS12 or TLS13 (older versions are not served).")
        setattr(ctx, "minimum_version" if bound == "min_version" else "maximum_version", TLS_VERSIONS[name])
    if ctx.minimum_version < ssl.TLSVersion.TLSv1_2:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ctx.maximum_version != ssl.TLSVersion.MAXIMUM_SUPPORTED and ctx.maximum_version < ctx.minimum_version:
        raise WebConfigError("tls_server_config: max_version is below min_version.")

    def no_passphrase():
        # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
        raise WebConfigError(f"tls_server_config: key_file {key} is encrypted: give an unencrypted key.")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise WebConfigError(f"tls_server_config: key_file {key} is not the key of cert_file {cert}.") from None
        raise WebConfigError(f"tls_server_config: cert_file {cert} and key_file {key} are not a PEM "
                             "certificate and its key.") from None
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise WebConfigError(f"tls_server_config: client_ca_file {ca} holds no PEM certificate ({e.reason or e}).") from None
    ctx.verify_mode = mode
    return ctx


def _mapping(value, what):
    if not isinstance(value, dict):
        raise WebConfigError(f"{what} must be a mapping of keys to values, not {type(value).__name__}.")


def _known(mapping, keys, what):
    for key in mapping:
        if key in UNSUPPORTED:
            raise WebConfigError(f"{what}: {key} is not supported by tcptrace ({UNSUPPORTED[key]}).")
        if key not in keys:
            raise WebConfigError(f"{what}: unknown key {key!r} (known: {', '.join(sorted(keys))}).")


def _reason(e):
    return getattr(e, "strerror", None) or str(e)


# -- checking credentials ---------------------------------------------------------


class BasicAuth:
    """Checks Authorization headers against the bcrypt hashes.

    bcrypt is slow on purpose (~70 ms at cost 10) and a scraper returns every
    few seconds with the same credentials, so a success is remembered for a
    minute, under a keyed digest: the cache never holds a password.
    """

    def __init__(self, users, clock=time.monotonic):
        self.users = [(name.encode(), hashed) for name, hashed in users.items()]
        self.clock = clock
        self.key = secrets.token_bytes(32)
        self.cache = {}  # digest -> time it expires
        self.lock = threading.Lock()

    def check(self, header):
        """True if the header carries a configured user and its password."""
        credentials = _basic(header)
        if credentials is None:
            return False
        name, password = credentials
        digest = hmac.new(self.key, name + b"\0" + password, hashlib.sha256).digest()
        now = self.clock()
        with self.lock:
            if self.cache.get(digest, 0) > now:
                return True
        # Every name is compared, and bcrypt runs for an unknown name too, so
        # the time taken does not tell which names exist.
        hashed, known = self.users[0][1], False
        for user, user_hash in self.users:
            if hmac.compare_digest(user, name):
                hashed, known = user_hash, True
        try:
            ok = bcrypt_check(password, hashed) and known
        except ValueError:
            ok = False
        if ok:
            with self.lock:
                if len(self.cache) >= AUTH_CACHE_SIZE:
                    self.cache = {d: t for d, t in self.cache.items() if t > now}
                if len(self.cache) < AUTH_CACHE_SIZE:
                    self.cache[digest] = now + AUTH_CACHE_SECONDS
        return ok


def bcrypt_check(password, hashed):
    import bcrypt

    return bcrypt.checkpw(password, hashed)


def _basic(header):
    """(name, password) bytes of a Basic Authorization header, or None."""
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return None
    name, colon, password = decoded.partition(b":")
    return (name, password) if colon else None


# -- serving ----------------------------------------------------------------------


def make_app(metrics_app, auth=None):
    """The WSGI app: /metrics behind basic auth when users are configured,
    /healthz for probes (it says only that the process serves)."""

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _reply(start_response, "200 OK", b"ok\n")
        if path != "/metrics":
            return _reply(start_response, "404 Not Found", b"not found: metrics are at /metrics\n")
        if auth is not None and not auth.check(environ.get("HTTP_AUTHORIZATION")):
            return _reply(start_response, "401 Unauthorized", b"unauthorized\n",
                          [("WWW-Authenticate", 'Basic realm="tcptrace", charset="UTF-8"')])
        return metrics_app(environ, start_response)

    return app


def _reply(start_response, status, body, headers=()):
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # stderr is for tcptrace's own status lines
        pass


class MetricsServer(ThreadingMixIn, WSGIServer):
    """Serves a prometheus_client registry on a socket already bound and
    listening (binding early makes a port in use fail before any BPF work).

    The TLS handshake runs in each connection's own thread: done in accept(),
    one slow or silent client would stall every other scrape.
    """

    daemon_threads = True

    def __init__(self, sock, registry, config):
        from prometheus_client import make_wsgi_app

        super().__init__(sock.getsockname()[:2], _Quiet, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.address_family = sock.family
        sock.listen(128)
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()
        self.tls = config.tls
        self.set_app(make_app(make_wsgi_app(registry), BasicAuth(config.users) if config.users else None))
        self.thread = None
        self.last_round = time.monotonic()  # when the serving loop last went round

    @property
    def scheme(self):
        return "https" if self.tls else "http"

    def finish_request(self, request, client_address):
        request.settimeout(IO_TIMEOUT)
        if self.tls is None:
            return super().finish_request(request, client_address)
        try:
            # wrap_socket takes the connection's descriptor over: from here on
            # only the TLS socket can close it.
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # plain HTTP, a refused client certificate, a port scan
        try:
            super().finish_request(conn, client_address)
        finally:
            self.shutdown_request(conn)

    def shutdown_request(self, request):
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        request.close()

    def handle_error(self, request, client_address):
        pass  # a client that went away mid-request is not tcptrace's failure

    def service_actions(self):
        # serve_forever() calls this on each round of its loop (every
        # poll_interval at least): the loop's heartbeat, for the watchdog.
        self.last_round = time.monotonic()

    def serving_within(self, seconds):
        """True if the serving loop is alive and went round in the last `seconds`."""
        alive = self.thread is not None and self.thread.is_alive()
        return alive and time.monotonic() - self.last_round <= seconds

    def start(self):
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="tcptrace-http", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.thread is not None:
            self.shutdown()
            self.thread.join()
            self.thread = None
        self.server_close()
