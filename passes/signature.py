"""What a pass added to a graph's calling convention, by name: built by the pass, read by the
runtime. The added inputs come after the graph's own, the added outputs after its own, each in
the order given here; nothing else needs to know a position."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class GraphSignature:
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def bind(self, args: Sequence[Any], values: Mapping[str, Any]) -> list[Any]:
        """The graph's own ``args`` followed by the added inputs, taken from ``values`` (a list
        value, such as a policy's state, is spread over consecutive inputs)."""
        full = list(args)
        for name in self.inputs:
            v = values[name]
            full.extend(v) if isinstance(v, (list, tuple)) else full.append(v)
        return full

    def split(self, outs: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
        """(the graph's own outputs, the added ones by name)."""
        n = len(outs) - len(self.outputs)
        return list(outs[:n]), dict(zip(self.outputs, outs[n:]))

    def output_index(self, name: str, total: int) -> int:
        """Where the added output ``name`` is among ``total`` outputs."""
        return total - len(self.outputs) + self.outputs.index(name)
