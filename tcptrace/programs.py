"""Every program tcptrace loads, by subcommand: the event tools and the
exporter. `doctor` checks each of them; the docs list each of them."""

from . import exporter
from .tools import TOOLS

PROGRAMS = {**TOOLS, exporter.SPEC.name: exporter.SPEC}
