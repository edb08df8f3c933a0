"""The registry of tools: one line per subcommand."""

from . import accept, connect, drops, life, probe, resets, retrans, states, top

TOOLS = {spec.name: spec for spec in (states.SPEC, life.SPEC, resets.SPEC, retrans.SPEC, connect.SPEC,
                                      accept.SPEC, drops.SPEC, probe.SPEC, top.SPEC)}
