"""The command line: every option of every tool, valid and not.

Validation happens in click, before any BPF work: a bad value is a usage
error naming the option, exit status 2, no traceback.
"""

import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from tcptrace import __version__
from tcptrace.cli import OPTIONS, cli
from tcptrace.tools import TOOLS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# option name in the vocabulary -> (flag, bad values)
BAD = {
    "pid": ("-p", ["abc", "-1", "0", "", ",", "1,,2", "1;2", "4194305", "99999999999", "1 2",
                   f"{2**22 - 1}"]),
    "localport": ("-L", ["0", "65536", "-5", "http", "", ",", "80,", "80;rm", "8o", "1e3",
                         ",".join(str(p) for p in range(1, 70))]),
    "remoteport": ("-D", ["0", "65536", "x", "", "443,,80", "/*", "\"80\""]),
    "interval": ("-i", ["0", "-1", "abc", "nan"]),
    "top": ("--top", ["0", "-3", "x"]),
}
COMMON_BAD = [
    ("-o", "xml"), ("-o", ""), ("--output", "JSON "), ("--duration", "0"), ("--duration", "-1"),
    ("--duration", "soon"), ("--max-events", "0"), ("--max-events", "-2"), ("--max-events", "1.5"),
    ("--buffer", "mmap"), ("--buffer-pages", "3"), ("--buffer-pages", "0"), ("--buffer-pages", "131072"),
    ("--buffer-pages", "x"),
]
CASES = []
for spec in TOOLS.values():
    for name in spec.options:
        if name in BAD:
            flag, values = BAD[name]
            extra = ["-c"] if name in ("interval", "top") and "count" in spec.options else []
            for value in values:
                CASES.append((spec.name, [flag, value, *extra]))
    for flag, value in COMMON_BAD:
        CASES.append((spec.name, [flag, value]))


@pytest.mark.parametrize("tool,args", CASES, ids=[f"{t}:{' '.join(a)}" for t, a in CASES])
def test_bad_values_are_usage_errors(tool, args, report):
    result = CliRunner().invoke(cli, [tool, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    flag = args[0]
    assert flag in result.output or "Invalid value" in result.output
    message = result.output.strip().splitlines()[-1].replace(f"{tool} ", "")
    shown = " ".join(repr(a) if (not a or " " in a or "\n" in a) else a for a in args)
    report("Bad input", f"`{shown}`", f"exit 2: {message.replace('|', '/')}")


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_conflicting_options(tool):
    spec = TOOLS[tool]
    runner = CliRunner()
    if "ipv4" in spec.options:
        result = runner.invoke(cli, [tool, "-4", "-6"])
        assert result.exit_code == 2 and "-4/--ipv4" in result.output
    if "interval" in spec.options:
        result = runner.invoke(cli, [tool, "-i", "1"])
        assert result.exit_code == 2 and "--count" in result.output
    result = runner.invoke(cli, [tool, "--no-such-option"])
    assert result.exit_code == 2
    result = runner.invoke(cli, [tool, "stray-argument"])
    assert result.exit_code == 2


def test_pid_that_does_not_exist():
    tools = [t for t, s in TOOLS.items() if "pid" in s.options]
    for tool in tools:
        result = CliRunner().invoke(cli, [tool, "-p", "4194303"])
        assert result.exit_code == 2 and "no process has PID 4194303" in result.output


def test_unknown_command_and_version():
    runner = CliRunner()
    assert runner.invoke(cli, ["nosuchtool"]).exit_code == 2
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for tool in TOOLS:
        assert tool in result.output
    assert "Exit status:" in result.output


def test_same_letter_same_meaning_everywhere():
    """A short option names one vocabulary entry in every subcommand."""
    seen = {}
    for tool in TOOLS:
        command = cli.commands[tool]
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("-") and not opt.startswith("--"):
                    assert seen.setdefault(opt, param.name) == param.name, (tool, opt)
    assert "-s" not in seen  # bcc uses -s for two different things


def test_every_vocabulary_entry_is_used():
    """Each option of the shared vocabulary is a parameter of some subcommand
    (the exporter and doctor included), with its own flags and destination."""
    params = {(tuple(p.opts), p.name) for command in cli.commands.values() for p in command.params}
    unused = []
    for name, declare in OPTIONS.items():
        option = declare(click.Command("probe")).params[-1]
        if (tuple(option.opts), option.name) not in params:
            unused.append(name)
    assert unused == []


def test_injection_cannot_reach_the_program(tmp_path):
    """Quotes, semicolons, newlines and comment markers in options are refused
    before any code is generated, so --ebpf output never carries them."""
    formats = os.path.join(ROOT, "tests", "data", "formats", "6.18")
    runner = CliRunner()
    clean = runner.invoke(cli, ["states", "--ebpf", "--formats", formats, "-L", "80"])
    assert clean.exit_code == 0, clean.output
    for evil in ['80"; }', "80\n#define X", "80/*", "*/80", "80;", "80 || 1", "0x50"]:
        result = runner.invoke(cli, ["states", "--ebpf", "--formats", formats, "-L", evil])
        assert result.exit_code == 2, evil
        assert "struct tp_" not in result.output and "on_inet_sock_set_state" not in result.output
    # Values reach the program only as map entries or integer defines: the
    # program text does not depend on which port was asked for.
    other = runner.invoke(cli, ["states", "--ebpf", "--formats", formats, "-L", "443"])
    assert other.output == clean.output


def test_ebpf_prints_program_for_another_kernel():
    formats = os.path.join(ROOT, "tests", "data", "formats", "6.1")
    result = CliRunner().invoke(cli, ["states", "--ebpf", "--formats", formats])
    assert result.exit_code == 0
    assert "generated for Linux 6.1.0-56-amd64" in result.output
    assert "struct tp_inet_sock_set_state {" in result.output
    assert "int on_inet_sock_set_state(struct tp_inet_sock_set_state *args)" in result.output


def test_usage_errors_in_a_real_process():
    """Through the installed entry point: exit 2, one message, no traceback."""
    result = subprocess.run([sys.executable, "-m", "tcptrace", "states", "-L", "70000"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "-L" in result.stderr
