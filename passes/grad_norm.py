"""Append computations over the gradients to a partitioned backward graph.

The backward graph AOTAutograd hands to Inductor returns one output per flat forward input;
``insert_grad_norm`` traces ``compute(grads, inputs)`` over the outputs at ``grad_positions``
(and over added inputs, placeholders after the graph's own) and appends what it returns as
outputs. compileclip's ``compute`` is the norm of each gradient (one ``compileclip::grad_norms``
call per device and dtype): the gradients themselves are left as they are, since only the
optimizer step knows whether they are final. Everything is inserted before the output node, with
``meta["val"]`` for Inductor's lowering.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .signature import GraphSignature
from .tracing import output_node, trace_into


def output_values(gm: fx.GraphModule, positions: Sequence[int]) -> list[torch.Tensor]:
    """The fake values of the outputs at ``positions``."""
    outs = output_node(gm.graph).args[0]
    return [outs[i].meta["val"] for i in positions]


def insert_grad_norm(gm: fx.GraphModule, grad_positions: Sequence[int], compute: Callable, *,
                     inputs: Mapping[str, torch.Tensor] | None = None) -> GraphSignature:
    """Append ``compute(grads, added_inputs) -> {name: value}`` (see the module docstring).
    ``inputs``: name -> example value of each added 0-d input."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    if fake_mode is None:
        raise RuntimeError("insert_grad_norm needs a graph traced with FakeTensor values")
    out = output_node(graph)
    outputs = list(out.args[0])
    grads = [outputs[i] for i in grad_positions]
    if not grads or any(not isinstance(g, fx.Node) for g in grads):
        raise ValueError(f"grad_positions {list(grad_positions)} must select tensor outputs")
    added = {}
    anchor = placeholders[-1]
    for name, example in (inputs or {}).items():
        with graph.inserting_after(anchor):
            anchor = added[name] = graph.placeholder(name)
        with fake_mode:
            anchor.meta["val"] = torch.empty(example.shape, dtype=example.dtype, device=example.device)
    extra = trace_into(gm, out, compute, (grads, added), meta_key="val", fake_mode=fake_mode)
    out.args = (tuple(outputs) + tuple(extra.values()),)
    desc = out.meta.get("desc")
    if isinstance(desc, (list, tuple)):
        out.meta["desc"] = [*desc, *[None] * len(extra)]
    graph.lint()
    gm.recompile()
    return GraphSignature(tuple(added), tuple(extra))
