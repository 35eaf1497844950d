"""Make a compiled optimizer step's writes conditional on a device-side flag (no host sync).

After AOTAutograd functionalizes a step graph, every in-place update of an input (parameters,
optimizer state such as ``exp_avg`` and the ``step`` counters, ``.grad``) appears as one
``aten.copy_(input, new_value)`` at the end of the graph. This rewrite, on that aten-level
inference graph, turns each of them into::

    copy_(input, where(skip, input, new_value))

where ``skip`` is a 0-d graph output that is nonzero for a step to skip (the clip's
``nonfinite`` flag). Inductor computes the ``where`` inside the loop that computes
``new_value``, which reads ``input`` anyway for the update, so the guard costs no pass of
its own. Inputs listed in ``exclude`` (the ``.grad`` write-back, which eager leaves
clipped even on a skipped step) are not guarded.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten


def guard_input_mutations(gm: fx.GraphModule, flag_output: int, exclude: Collection[int] = ()) -> int:
    """Guard every ``copy_`` into a placeholder of ``gm`` (except the placeholders at the
    positions in ``exclude``) with the graph output at index ``flag_output`` (see the module
    docstring). Returns how many writes were guarded."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = output.args[0]
    flag = outs[flag_output]
    fval = flag.meta.get("val") if isinstance(flag, fx.Node) else None
    if fval is None or fval.dim() != 0:
        raise ValueError(f"output {flag_output} of the step graph is not a 0-d tensor: {flag!r}")
    excluded = {placeholders[i] for i in exclude}
    copies = [
        n for n in graph.nodes
        if n.op == "call_function" and n.target is aten.copy_.default
        and n.args[0] in placeholders and n.args[0] not in excluded
    ]
    order = {n: i for i, n in enumerate(graph.nodes)}
    if any(order[c] < order[flag] for c in copies):
        raise ValueError("an input is written before the skip flag is computed; cannot guard it")
    fake_mode = detect_fake_mode([fval])
    skip_on: dict[torch.device, fx.Node] = {}

    def skip_for(device: torch.device) -> fx.Node:
        # one comparison per device, right after the flag is computed
        node = skip_on.get(device)
        if node is None:
            with graph.inserting_after(flag):
                node = graph.call_function(aten.gt.Scalar, (flag, 0))
            src = flag
            if device != fval.device:
                with graph.inserting_after(flag):
                    src = graph.call_function(aten._to_copy.default, (flag,), {"device": device})
                node.args = (src, 0)
            with fake_mode:
                src.meta["val"] = fval.to(device)
                node.meta["val"] = torch.empty((), dtype=torch.bool, device=device)
            skip_on[device] = node
        return node

    for node in copies:
        dst, new = node.args[0], node.args[1]
        dval = dst.meta["val"]
        with graph.inserting_before(node):
            guarded = graph.call_function(aten.where.self, (skip_for(dval.device), dst, new))
        guarded.meta["val"] = new.meta["val"] if isinstance(new, fx.Node) else dval
        node.args = (dst, guarded, *node.args[2:])
    graph.lint()
    gm.recompile()
    return len(copies)
