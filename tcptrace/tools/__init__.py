"""The registry of tools: one line per subcommand."""

from . import accept, connect, drops, life, resets, retrans, states

TOOLS = {spec.name: spec for spec in (states.SPEC, life.SPEC, resets.SPEC, retrans.SPEC, connect.SPEC,
                                      accept.SPEC, drops.SPEC)}
