"""The fleet end to end: a real Prometheus (Debian's, with promtool) scrapes a
real `tcptrace exporter` over TLS with basic auth, configured from the
examples in deploy/prometheus/, while the test makes known traffic; its HTTP
API must then show increases equal to that traffic, and every expression of
the recording rules and of the Grafana dashboard must return data.

Prometheus runs on a free loopback port with a temporary config and storage,
scraping every second; the service Debian's package installs is never used.
promtool checks the config and the rules, and runs the alerts' unit tests
(deploy/prometheus/tcptrace.test.yml), without root.
"""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import bcrypt
import pytest
import yaml

from endpoint import Endpoint
from helpers import ROOT, free_port, must_run
from netns import RECEIVER_ADDR, SENDER_ADDR, LinkPair
from test_exporter_live import Exporter
from test_retrans_live import Processes, pin_client_port, ports, settle, wait_for
from test_webconfig import self_signed


DEPLOY = os.path.join(ROOT, "deploy", "prometheus")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "tcptrace.json")
RULES = ("tcptrace.rules.yml", "tcptrace.alerts.yml")
PASSWORD = "scrape me"
N = 10  # loopback sessions, as in the report that asked for series at 0
LOSS_SIZE = 2_000_000


def tool(name):
    path = shutil.which(name)
    if not path:
        message = f"{name} is missing: Debian's prometheus package provides it (make test-deps)"
        if must_run():
            pytest.fail(message)
        pytest.skip(message)
    return path


def promtool(*args, cwd=DEPLOY):
    proc = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# -- promtool, without root -----------------------------------------------------------


def test_promtool_checks_the_rules():
    out = promtool("check", "rules", *RULES)
    assert out.count("SUCCESS") == 2


def test_promtool_runs_the_alerts_unit_tests():
    assert "SUCCESS" in promtool("test", "rules", "tcptrace.test.yml")


def test_every_alert_is_unit_tested_and_tells_what_to_run():
    with open(os.path.join(DEPLOY, "tcptrace.alerts.yml")) as f:
        alerts = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    with open(os.path.join(DEPLOY, "tcptrace.test.yml")) as f:
        tests = yaml.safe_load(f)["tests"]
    fired = {t["alertname"] for test in tests for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {a["alert"] for a in alerts}
    for a in alerts:
        assert a["for"] and a["labels"]["severity"] in ("info", "warning", "critical"), a["alert"]
        assert a["annotations"]["summary"] and re.search(r"`(tcptrace|systemctl|journalctl|ss|nstat)[^`]*`",
                                                         a["annotations"]["description"]), a["alert"]


@pytest.mark.parametrize("name", ["prometheus.yml", "kubernetes.yml"])
def test_promtool_checks_the_scrape_configs(tmp_path, name):
    """The examples as shipped, next to the rules and the CA and password
    files they name. Debian's Prometheus has no Kubernetes discovery: there
    the Kubernetes example is held to the static one and the DaemonSet."""
    for f in (name, *RULES):
        shutil.copy(os.path.join(DEPLOY, f), tmp_path)
    (tmp_path / "tcptrace-ca.crt").write_text("")
    (tmp_path / "tcptrace.password").write_text(PASSWORD)
    with open(tmp_path / name) as f:
        config = yaml.safe_load(f)
    proc = subprocess.run([tool("promtool"), "check", "config", name], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    if name == "kubernetes.yml" and "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        with open(os.path.join(DEPLOY, "prometheus.yml")) as f:
            static = yaml.safe_load(f)["scrape_configs"][0]
        [job] = config["scrape_configs"]
        for key in ("scheme", "tls_config", "basic_auth"):
            assert job[key] == static[key], key
        with open(os.path.join(ROOT, "deploy", "daemonset.yaml")) as f:
            pod = yaml.safe_load(f)["spec"]["template"]["metadata"]
        name_label = pod["labels"]["app.kubernetes.io/name"]
        assert job["kubernetes_sd_configs"][0]["selectors"][0]["label"] == f"app.kubernetes.io/name={name_label}"
        keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        assert keep[0]["regex"] == name_label
        assert pod["annotations"]["prometheus.io/scheme"] == job["scheme"]
        assert any(r.get("target_label") == "node" for r in job["relabel_configs"])
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert config["rule_files"] == list(RULES)


# -- a real Prometheus scraping a real exporter -------------------------------------


class Prometheus:
    """Debian's prometheus binary on a free loopback port, temporary storage."""

    def __init__(self, config, workdir):
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))

    def __enter__(self):
        self.log = open(self.workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(self.ready, "Prometheus to be ready", timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def ready(self):
        assert self.proc.poll() is None, self.logs()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def logs(self):
        return (self.workdir / "prometheus.log").read_text()

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr, at=None):
        """[(labels, value)] of an instant query."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr, at=None):
        result = self.query(expr, at)
        assert len(result) <= 1, (expr, result)
        return result[0][1] if result else None

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return False


def scrape_setup(tmp_path, target):
    """The shipped static example, pointed at `target`, every second, with a
    real CA and password; its web config for the exporter."""
    self_signed("server", "/CN=tcptrace-exporter", tmp_path, "-addext", "subjectAltName=DNS:tcptrace-exporter")
    (tmp_path / "tcptrace.password").write_text(PASSWORD)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web-config.yml").write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
        "basic_auth_users": {"prometheus": hashed}}))
    with open(os.path.join(DEPLOY, "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [os.path.join(DEPLOY, r) for r in RULES]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    job["tls_config"]["ca_file"] = str(tmp_path / "server.crt")
    job["basic_auth"]["password_file"] = str(tmp_path / "tcptrace.password")
    return config, tmp_path / "web-config.yml"


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", ()):
            out.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((var["name"], var["query"]["query"]))
    return out


def grafana_to_promql(expr):
    """What Grafana sends for the dashboard's variables: every node, and a
    rate interval of four scrape intervals; every node and cgroup. label_values() is Grafana's own
    function: the series it reads from is queried instead."""
    m = re.fullmatch(r"label_values\((\w+), (\w+)\)", expr)
    if m:
        return f"count by ({m.group(2)}) ({m.group(1)})"
    return re.sub(r'=~"\$(node|cgroup)"', '=~".*"', expr).replace("$__rate_interval", "1m")


def rule_exprs():
    out = []
    with open(os.path.join(DEPLOY, "tcptrace.rules.yml")) as f:
        for group in yaml.safe_load(f)["groups"]:
            for rule in group["rules"]:
                out.append((rule["record"], rule["expr"]))
    return out


def test_prometheus_scrapes_known_traffic(bpf, tmp_path):
    """Sessions, a refused connect and a lossy transfer through a
    namespace, scraped every second from the exporter's start: the counters'
    increases in Prometheus equal the traffic, exact where the traffic is
    (the sessions, the refused connect, each segment nftables dropped),
    bounded where the kernel decides (retransmits: at most the segments
    nstat says it sent again)."""
    sport, closed, cport = free_port(), free_port(), free_port()
    ns_sport, ns_cport = ports()
    port = free_port()
    config, web_config = scrape_setup(tmp_path, f"127.0.0.1:{port}")
    lports = f"{sport},{closed},{cport},{ns_sport},{ns_cport}"
    with Exporter("-L", lports, "--top-cgroups", "5", "--web-config", str(web_config), port=port) as exp, \
            Prometheus(config, tmp_path) as prom, LinkPair() as link, Processes(link) as procs:
        sel = '{job="tcptrace", node="127.0.0.1"}'
        # The first scrape already holds the series the traffic will move, at 0.
        wait_for(lambda: prom.value('tcptrace_tcp_drops_total{job="tcptrace", reason="NO_SOCKET"}') == 0,
                 "the first scrape", timeout=60)
        assert prom.value(f"up{sel}") == 1 and prom.value(f"tcptrace_up{sel}") == 1
        t0 = time.time()
        time.sleep(1.5)  # a scrape at 0 strictly before the traffic

        server = Endpoint("server", "127.0.0.1", sport, "--accept", N)
        for _ in range(N):
            assert Endpoint("client", "127.0.0.1", sport, "--send", 1000, "--close-first").outcome() == "ok"
        server.outcome()
        assert Endpoint("client", "127.0.0.1", closed, "--bind-port", cport).outcome() == "refused"

        pin_client_port(link, ns_cport)
        # lose_tcp()'s rule with a counter: the packets it dropped, exactly.
        link.drop_input(link.receiver, f"ip saddr {SENDER_ADDR} meta l4proto tcp numgen random mod 10 < 2 counter")
        before = link.retrans_segs(link.sender)
        receiver = procs.peer(link.receiver, "server", RECEIVER_ADDR, ns_sport, "--recv", LOSS_SIZE)
        sender = procs.peer(link.sender, "client", RECEIVER_ADDR, ns_sport, "--send", LOSS_SIZE, "--close-first")
        procs.finish(sender)
        procs.finish(receiver)
        settle(link)
        sent_again = link.retrans_segs(link.sender) - before
        dropped = nft_dropped(link)
        link.clear_rules(link.receiver)

        def increase(metric, **labels):
            match = ", ".join(f'{k}="{v}"' for k, v in {"job": "tcptrace", **labels}.items())
            return (prom.value(f"sum({metric}{{{match}}})") or 0) - (prom.value(f"sum({metric}{{{match}}})", t0) or 0)

        drops = "tcptrace_tcp_drops_total"
        wait_for(lambda: increase(drops, reason="NETFILTER_DROP") == dropped and
                 increase("tcptrace_tcp_session_duration_seconds_count") == N + 3,
                 "Prometheus to scrape the last counts", timeout=30)
        time.sleep(2)
        moves = "tcptrace_tcp_state_transitions_total"
        # The N sessions, seen from the listener's side (-L sport), and the
        # listener's own start and end.
        assert increase(moves, **{"from": "LISTEN", "to": "SYN_RECV"}) == N + 1  # + the namespace's server
        assert increase(moves, **{"from": "SYN_RECV", "to": "ESTABLISHED"}) == N + 1
        assert increase(moves, **{"from": "CLOSE", "to": "LISTEN"}) == 2
        assert increase(moves, **{"from": "LISTEN", "to": "CLOSE"}) == 2
        # Connects: the refused one (its port is cport) and the namespace's client.
        assert increase("tcptrace_tcp_connects_total", result="REFUSED") == 1
        assert increase("tcptrace_tcp_connects_total", result="OK") == 1
        assert increase("tcptrace_tcp_connects_total") == 2
        assert increase("tcptrace_tcp_resets_total", direction="received") == 1
        assert increase("tcptrace_tcp_resets_total", direction="sent") == 1
        assert increase(drops, reason="NO_SOCKET") == 1  # the refused SYN
        assert increase(drops, reason="NETFILTER_DROP") == dropped >= 1
        # Segments sent again that had arrived after all (TCP_OLD_DATA...).
        assert 0 <= increase(drops) - 1 - dropped <= sent_again
        # Sessions closed: N children, the refused connect, both ends in the namespace.
        assert increase("tcptrace_tcp_session_duration_seconds_count") == N + 3
        retrans = increase("tcptrace_tcp_retransmits_total")
        assert 1 <= retrans <= sent_again
        assert increase("tcptrace_lost_events_total") == 0

        for name, expr in rule_exprs():
            assert prom.query(expr), f"recording rule {name} returned nothing: {expr}"
            wait_for(lambda: prom.query(name), f"the recorded series {name}", timeout=10)
        for title, expr in dashboard_exprs():
            assert prom.query(grafana_to_promql(expr)), f"dashboard panel {title!r} shows nothing: {expr}"
        # Rates, ratios and quantiles are numbers, not NaN: traffic was made.
        for name in ("node:tcptrace_tcp_session_duration_seconds:p99_5m",
                     "node:tcptrace_tcp_retransmits_per_connection:ratio_rate5m",
                     "node:tcptrace_tcp_connect_failures:ratio_rate5m"):
            assert all(v == v and v > 0 for _labels, v in prom.query(name)), name
        assert prom.query('ALERTS{alertname=~"Tcptrace.*", alertstate="firing"}') == []
    assert exp.returncode == 0, exp.stderr
    assert "Traceback" not in exp.stderr


def nft_dropped(link):
    """Packets the receiver's loss rule dropped (its nftables counter)."""
    out = link.ns(link.receiver, "nft", "-j", "list", "table", "inet", "tcptrace_test").stdout
    total = 0
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", ()):
            if "counter" in expr:
                total += expr["counter"]["packets"]
    return total
