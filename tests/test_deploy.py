"""deploy/: the systemd unit, the Kubernetes DaemonSet and the Containerfile
agree with each other and with `tcptrace exporter`'s defaults; systemd
accepts the unit; and (privileged) the exporter runs with no more
capabilities than the unit grants."""

import configparser
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
import yaml

from helpers import ROOT, free_port, must_run, ready, tcptrace_cmd
from tcptrace import exporter

DEPLOY = os.path.join(ROOT, "deploy")
UNIT = os.path.join(DEPLOY, "tcptrace-exporter.service")
DAEMONSET = os.path.join(DEPLOY, "daemonset.yaml")
CONTAINERFILE = os.path.join(DEPLOY, "Containerfile")
DEFAULT_HOST, DEFAULT_PORT, _ = exporter.parse_listen(exporter.DEFAULT_LISTEN)
# Linux 5.8+: programs and maps, tracing; and reading tracefs's root-only
# format files as a user other than root.
UNIT_CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"}
# uid 0 in the pod owns those files: no DAC capability needed there.
POD_CAPS = {"BPF", "PERFMON"}
WEB_CONFIG = "/etc/tcptrace/web-config.yml"


def listen_of(argv, env=None):
    """(host, port, version) of an exporter command line, or of its default;
    Kubernetes' $(VAR) references are replaced from env."""
    assert argv[:2] == ["tcptrace", "exporter"], argv
    if "--listen" in argv:
        value = argv[argv.index("--listen") + 1]
        for name, sample in (env or {}).items():
            value = value.replace(f"$({name})", sample)
        return exporter.parse_listen(value)
    return exporter.parse_listen(exporter.DEFAULT_LISTEN)


def option(argv, name):
    assert argv.count(name) == 1, argv
    return argv[argv.index(name) + 1]


def analyze():
    path = shutil.which("systemd-analyze")
    if not path:
        if must_run():
            pytest.fail("systemd-analyze is missing: apt-get install systemd")
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    return path


def unit_here(tmp_path):
    """The unit, its ExecStart pointed at this install (verify checks that
    the program exists)."""
    here = os.path.join(os.path.dirname(sys.executable), "tcptrace")
    assert os.access(here, os.X_OK), here
    with open(UNIT) as f:
        text = f.read()
    path = tmp_path / "tcptrace-exporter.service"
    path.write_text(text.replace("/usr/local/bin/tcptrace", here))
    return path


# -- systemd -------------------------------------------------------------------------


def unit():
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_unit_runs_the_exporter_on_the_default_address_with_a_web_config():
    service = unit()["Service"]
    argv = ["tcptrace", *shlex.split(service["ExecStart"])[1:]]
    assert os.path.isabs(shlex.split(service["ExecStart"])[0])
    assert os.path.basename(shlex.split(service["ExecStart"])[0]) == "tcptrace"
    assert listen_of(argv) == (DEFAULT_HOST, DEFAULT_PORT, 4)
    assert option(argv, "--web-config") == WEB_CONFIG
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_runs_as_no_root_with_exactly_the_capabilities():
    service = unit()["Service"]
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "", "root", "0")
    assert "User" not in service or service["User"] not in ("root", "0")
    assert set(service["CapabilityBoundingSet"].split()) == UNIT_CAPS
    assert set(service["AmbientCapabilities"].split()) == UNIT_CAPS
    # It cannot mount tracefs itself (no CAP_SYS_ADMIN): systemd must have.
    assert "sys-kernel-tracing.mount" in unit()["Unit"]["Wants"].split()
    assert "sys-kernel-tracing.mount" in unit()["Unit"]["After"].split()


def test_unit_tells_systemd_when_it_serves_and_that_it_lives():
    service = unit()["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"].endswith("s") and int(service["WatchdogSec"][:-1]) >= 10


def test_unit_is_hardened_around_what_bpf_needs():
    service = unit()["Service"]
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "PrivateDevices": "yes", "ProtectKernelModules": "yes", "ProtectKernelTunables": "yes",
                "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectProc": "invisible",
                "RestrictSUIDSGID": "yes", "RestrictNamespaces": "yes", "LockPersonality": "yes",
                "SystemCallArchitectures": "native", "UMask": "0077",
                "LimitMEMLOCK": "infinity", "CacheDirectory": "tcptrace", "CacheDirectoryMode": "0700",
                "Restart": "on-failure"}
    assert {k: service.get(k) for k in expected} == expected
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Beyond @system-service, only what BPF itself needs.
    assert service["SystemCallFilter"].split() == ["@system-service", "bpf", "perf_event_open"]
    # The cache it writes under ProtectSystem=strict is the one CacheDirectory makes writable.
    assert service["Environment"] == "TCPTRACE_CACHE_DIR=/var/cache/tcptrace"
    # Statuses that a restart cannot fix (usage, privileges, bcc, tracefs, kernel, verifier).
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "4", "5", "6", "7", "8"}


def test_systemd_accepts_the_unit(tmp_path):
    path = unit_here(tmp_path)
    out = subprocess.run([analyze(), "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tcptrace-exporter.service" not in out.stderr, out.stderr


def test_systemd_rates_the_unit_ok_or_better(tmp_path):
    path = unit_here(tmp_path)
    out = subprocess.run([analyze(), "security", "--offline=yes", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "Overall exposure level" in line)
    score, level = line.split(":", 1)[1].split()[:2]
    # systemd rates 0-10, lower is safer, and names the level after the number.
    assert level in ("PERFECT", "SAFE", "OK") and float(score) <= 3.0, line


# -- Kubernetes ----------------------------------------------------------------------


def daemonset():
    with open(DAEMONSET) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert len(docs) == 1
    return docs[0]


def container_of(ds):
    [container] = ds["spec"]["template"]["spec"]["containers"]
    return container


def test_daemonset_runs_on_every_host_without_privilege():
    ds = daemonset()
    assert (ds["apiVersion"], ds["kind"]) == ("apps/v1", "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec.get("tolerations") == [{"operator": "Exists"}]  # every node, tainted or not
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container_of(ds)["securityContext"]
    assert ctx.get("privileged", False) is False
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert set(ctx["capabilities"]["add"]) == POD_CAPS
    # Kubernetes grants no ambient capabilities: a non-root user would hold
    # none of the added ones. uid 0 it is, with nothing but these.
    assert ctx["runAsUser"] == 0 and ctx["runAsNonRoot"] is False
    assert {"CAP_" + c for c in POD_CAPS} <= UNIT_CAPS


def test_daemonset_mounts_tracefs_btf_and_the_web_config_read_only():
    spec = daemonset()["spec"]["template"]["spec"]
    container = container_of(daemonset())
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf"):
        mount = mounts[path]
        assert volumes[mount["name"]]["hostPath"]["path"] == path
        assert mount.get("readOnly") is True
    secret = mounts[os.path.dirname(WEB_CONFIG)]
    assert secret.get("readOnly") is True
    assert volumes[secret["name"]]["secret"]["defaultMode"] == 0o400
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/var/cache/tcptrace", "/tmp"}
    for path in writable:
        assert "emptyDir" in volumes[mounts[path]["name"]]
    assert {"name": "TCPTRACE_CACHE_DIR", "value": "/var/cache/tcptrace"} in container["env"]


def test_daemonset_serves_tls_with_auth_on_the_nodes_address_only():
    ds = daemonset()
    container = container_of(ds)
    argv = container["command"] + container["args"]
    [node_ip] = [e for e in container["env"] if e["name"] == "NODE_IP"]
    assert node_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    host, port, _version = listen_of(argv, {"NODE_IP": "192.0.2.7"})
    assert port == DEFAULT_PORT and host == "192.0.2.7"
    assert option(argv, "--web-config") == WEB_CONFIG
    [metrics] = [p for p in container["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == metrics["hostPort"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get == {"path": "/healthz", "port": "metrics", "scheme": "HTTPS"}
    notes = ds["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(port) and notes["prometheus.io/path"] == "/metrics"
    assert notes["prometheus.io/scheme"] == "https"


# -- the image -----------------------------------------------------------------------


def instructions():
    """(INSTRUCTION, argument text) of the Containerfile, continuations joined."""
    with open(CONTAINERFILE) as f:
        text = f.read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_image_is_debian_with_the_distributions_bcc():
    steps = instructions()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("debian:")
    runs = " ".join(arg for word, arg in steps if word == "RUN")
    assert "apt-get install" in runs and "python3-bpfcc" in runs.split()
    assert "pip install" in runs and "/src" in runs
    assert "pip install bcc" not in runs  # the PyPI project of that name is unrelated
    for word, arg in steps:
        if word == "COPY":
            *sources, _dest = arg.split()
            for source in sources:
                assert os.path.exists(os.path.join(ROOT, source)), source


def test_image_runs_the_exporter():
    steps = dict(instructions())
    argv = json.loads(steps["ENTRYPOINT"]) + json.loads(steps["CMD"])
    host, port, _version = listen_of(argv)
    assert port == DEFAULT_PORT and steps["EXPOSE"] == str(port)
    container = container_of(daemonset())
    # The manifest runs the image's program, secured by its web config.
    assert container["command"] == json.loads(steps["ENTRYPOINT"])
    assert container["args"][0] == json.loads(steps["CMD"])[0]
    assert steps["ENV"] == "TCPTRACE_CACHE_DIR=/var/cache/tcptrace"


# -- the unit's capabilities, for real ------------------------------------------------


def serves_as(uid, caps):
    """Start the exporter as this uid with exactly these capabilities and no
    new privileges: for the unit, uid 65534 with them ambient (what
    DynamicUser= and AmbientCapabilities= give); for the pod, uid 0 with a
    bounding set of them. Scrape it once; (the text, its CapEff)."""
    port = free_port()
    given = ",".join(["-all"] + ["+" + c.lower().replace("cap_", "") for c in caps])
    if uid == 0:
        prefix = ["setpriv", f"--bounding-set={given}"]
    else:
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps={given}",
                  f"--ambient-caps={given}", f"--bounding-set={given}"]
    env = {k: v for k, v in os.environ.items() if k != "TCPTRACE_CACHE_DIR"}
    proc = subprocess.Popen([*prefix, "--no-new-privs", *tcptrace_cmd("exporter", "--listen", f"127.0.0.1:{port}")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        ready(proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        with open(f"/proc/{proc.pid}/status") as f:
            caps = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return text, caps


@pytest.mark.parametrize("uid, caps", [
    pytest.param(65534, None, id="the-units-user-and-set"),
    pytest.param(0, tuple("CAP_" + c for c in sorted(POD_CAPS)), id="the-pods-uid-0-and-set"),
])
def test_exporter_runs_with_exactly_the_capabilities_deployed(bpf, uid, caps):
    """Linux 5.8+: a user needs CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH
    (tracefs is root's); uid 0 owns tracefs and needs only the first two."""
    caps = caps or tuple(unit()["Service"]["AmbientCapabilities"].split())
    text, effective = serves_as(uid, caps)
    assert "tcptrace_up 1.0" in text
    assert f"tcptrace_programs_loaded {len(exporter.SPEC.tracepoints)}.0" in text
    numbers = {"CAP_DAC_READ_SEARCH": 2, "CAP_PERFMON": 38, "CAP_BPF": 39}
    assert effective == sum(1 << numbers[c] for c in caps)
