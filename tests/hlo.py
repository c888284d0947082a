"""Reading compiled HLO text: the sizes of its collectives (the sharded tests' communication bound)."""

import re

import numpy as np

COLLECTIVE = re.compile(
    r"=\s*(\([^)]*\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)
SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, int]]:
    """``(kind, element count)`` of every collective's operands in compiled HLO text."""
    out = []
    for match in COLLECTIVE.finditer(hlo):
        for dims in SHAPE.findall(match.group(1)):
            out.append((match.group(2), int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1))
    return out


def collective_sizes(hlo: str) -> list[int]:
    """The element counts of every collective's operands in compiled HLO text."""
    return [size for _, size in collectives(hlo)]
