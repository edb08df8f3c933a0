"""The registry of tools: one name per subcommand.

A tool's module is imported when it is asked for: a run of `tcptrace states`
declares states alone (start-up counts toward the time to the first event).
TOOLS, every spec by name, imports them all on first use."""

import importlib

NAMES = ("states", "life", "resets", "retrans", "connect", "accept", "drops", "probe", "top")


def spec(name):
    """The spec of one tool (its module is named after it)."""
    return importlib.import_module(f"{__name__}.{name}").SPEC


def __getattr__(attr):
    if attr == "TOOLS":
        tools = globals()["TOOLS"] = {name: spec(name) for name in NAMES}
        return tools
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
