"""The registry of tools: one line per subcommand."""

from . import states

TOOLS = {spec.name: spec for spec in (states.SPEC,)}
