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
import time
import urllib.request

import pytest
import yaml

from helpers import ROOT, free_port, tcptrace_cmd
from tcptrace import exporter

DEPLOY = os.path.join(ROOT, "deploy")
UNIT = os.path.join(DEPLOY, "tcptrace-exporter.service")
DAEMONSET = os.path.join(DEPLOY, "daemonset.yaml")
CONTAINERFILE = os.path.join(DEPLOY, "Containerfile")
DEFAULT_HOST, DEFAULT_PORT, _ = exporter.parse_listen(exporter.DEFAULT_LISTEN)


def listen_of(argv):
    """(host, port, version) of an exporter command line, or of its default."""
    assert argv[:2] == ["tcptrace", "exporter"], argv
    if "--listen" in argv:
        return exporter.parse_listen(argv[argv.index("--listen") + 1])
    return exporter.parse_listen(exporter.DEFAULT_LISTEN)


# -- systemd -------------------------------------------------------------------------


def unit():
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_unit_runs_the_exporter_on_the_default_address():
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert os.path.isabs(argv[0]) and os.path.basename(argv[0]) == "tcptrace"
    assert listen_of(["tcptrace", *argv[1:]]) == (DEFAULT_HOST, DEFAULT_PORT, 4)
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_is_hardened_around_what_bpf_needs():
    service = unit()["Service"]
    caps = set(service["CapabilityBoundingSet"].split())
    assert {"CAP_BPF", "CAP_PERFMON"} <= caps <= {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE", "CAP_SYS_ADMIN"}
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "PrivateDevices": "yes", "ProtectKernelModules": "yes", "RestrictSUIDSGID": "yes",
                "LimitMEMLOCK": "infinity", "CacheDirectory": "tcptrace", "Restart": "on-failure"}
    assert {k: service.get(k) for k in expected} == expected
    # The cache it writes under ProtectSystem=strict is the one CacheDirectory makes writable.
    assert service["Environment"] == "TCPTRACE_CACHE_DIR=/var/cache/tcptrace"
    # Statuses that a restart cannot fix (usage, privileges, bcc, tracefs, kernel, verifier).
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "4", "5", "6", "7", "8"}


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: point it at this install.
    here = os.path.join(os.path.dirname(sys.executable), "tcptrace")
    assert os.access(here, os.X_OK), here
    with open(UNIT) as f:
        text = f.read()
    path = tmp_path / "tcptrace-exporter.service"
    path.write_text(text.replace("/usr/local/bin/tcptrace", here))
    out = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tcptrace-exporter.service" not in out.stderr, out.stderr


# -- Kubernetes ----------------------------------------------------------------------


def daemonset():
    with open(DAEMONSET) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert len(docs) == 1
    return docs[0]


def test_daemonset_runs_privileged_on_the_host():
    ds = daemonset()
    assert (ds["apiVersion"], ds["kind"]) == ("apps/v1", "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    [container] = spec["containers"]
    assert container["securityContext"]["privileged"] is True
    assert spec.get("tolerations") == [{"operator": "Exists"}]  # every node, tainted or not


def test_daemonset_mounts_tracefs_and_btf():
    spec = daemonset()["spec"]["template"]["spec"]
    [container] = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf"):
        mount = mounts[path]
        assert volumes[mount["name"]]["hostPath"]["path"] == path
    assert mounts["/sys/kernel/btf"].get("readOnly") is True
    cache = mounts["/var/cache/tcptrace"]
    assert "emptyDir" in volumes[cache["name"]]
    assert {"name": "TCPTRACE_CACHE_DIR", "value": "/var/cache/tcptrace"} in container["env"]


def test_daemonset_serves_the_exporter_port():
    ds = daemonset()
    [container] = ds["spec"]["template"]["spec"]["containers"]
    argv = container["command"] + container["args"]
    host, port, _version = listen_of(argv)
    assert port == DEFAULT_PORT and host == "0.0.0.0"  # reachable by a Prometheus elsewhere
    [metrics] = [p for p in container["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == metrics["hostPort"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/metrics" and get["port"] in ("metrics", port)
    notes = ds["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(port) and notes["prometheus.io/path"] == "/metrics"


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
    [container] = daemonset()["spec"]["template"]["spec"]["containers"]
    assert container["command"] + container["args"] == argv  # the manifest runs what the image runs
    assert steps["ENV"] == "TCPTRACE_CACHE_DIR=/var/cache/tcptrace"


# -- the unit's capabilities, for real ------------------------------------------------


def serves_with_only(bpf_caps):
    """Start the exporter as root with only these capabilities in its
    bounding set (and no new privileges, as the unit says); scrape it once."""
    port = free_port()
    bounding = "-all," + ",".join("+" + c.lower().replace("cap_", "") for c in bpf_caps)
    proc = subprocess.Popen(["setpriv", f"--bounding-set={bounding}", "--no-new-privs",
                             *tcptrace_cmd("exporter", "--listen", f"127.0.0.1:{port}")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    text = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the exporter did not serve"
                time.sleep(0.2)
        with open(f"/proc/{proc.pid}/status") as f:
            caps = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return text, caps


@pytest.mark.parametrize("caps", [
    pytest.param(None, id="the-units-set"),
    pytest.param(("CAP_BPF", "CAP_PERFMON"), id="bpf-and-perfmon-only"),
])
def test_exporter_runs_with_the_units_capabilities(bpf, caps):
    """With tracefs mounted, Linux 5.8+ needs only CAP_BPF and CAP_PERFMON."""
    caps = caps or tuple(unit()["Service"]["CapabilityBoundingSet"].split())
    text, effective = serves_with_only(caps)
    assert "tcptrace_up 1.0" in text and "tcptrace_programs_loaded 5.0" in text
    numbers = {"CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}
    with open("/proc/self/status") as f:  # what this machine lets us have at all
        ours = int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)
    assert effective == sum(1 << numbers[c] for c in caps) & ours
