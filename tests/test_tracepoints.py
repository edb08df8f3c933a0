"""The one table of tracepoints and their first kernels, held to the tools
that declare them and to the formats of real kernels saved in tests/data."""

import os

import pytest

from tcptrace import tracefs, tracepoints
from tcptrace.headers import version_triple
from tcptrace.programs import PROGRAMS

FORMATS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "formats")
KERNELS = sorted((k for k in os.listdir(FORMATS) if k[0].isdigit()), key=version_triple)
DECLARED = [(spec.name, tp) for spec in PROGRAMS.values() for tp in spec.tracepoints]


@pytest.mark.parametrize("tool,tp", DECLARED, ids=[f"{n}-{tp.name}" for n, tp in DECLARED])
def test_every_declaration_takes_its_first_kernel_from_the_table(tool, tp):
    assert tp.name in tracepoints.FIRST, f"{tp.name} is not in tracepoints.FIRST"
    assert tp.since == tracepoints.since(tp.name, tp.fields)


def test_a_later_field_raises_the_first_kernel():
    assert tracepoints.since("skb:kfree_skb") == "4.15"
    assert tracepoints.since("skb:kfree_skb", ("skbaddr", "reason")) == "5.17"
    assert tracepoints.since("skb:kfree_skb", ("reason", "rx_sk")) == "6.10"
    # Alternatives: the earliest one is enough.
    assert tracepoints.since("tcp:tcp_retransmit_skb", (("err", "state"),)) == "5.4"
    assert tracepoints.since("tcp:unknown") == ""


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_table_agrees_with_saved_formats(kernel):
    """A saved kernel has every tracepoint it is new enough for that was
    saved, and a later field exactly when it is new enough for it."""
    source = tracefs.FormatSource(os.path.join(FORMATS, kernel))
    version = version_triple(source.kernel_release())
    checked = 0
    for name, first in tracepoints.FIRST.items():
        fmt = source.load(name)
        if fmt is None:
            continue  # not saved for this kernel
        assert version >= version_triple(first), f"{name} on {kernel}, before {first}"
        for field in tracepoints.FIELDS.get(name, {}):
            first, gone = tracepoints.field_range(name, field)
            present = version >= version_triple(first) and (gone is None or version < version_triple(gone))
            assert fmt.has(field) == present, (name, field, kernel)
            checked += 1
    assert checked or version < (4, 16, 0)
