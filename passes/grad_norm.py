"""Add the total norm of the parameter gradients to a partitioned backward graph.

The rewrite computes what ``torch.nn.utils.get_total_norm`` would return for the gradients
the graph produces::

    total = ||(||g_1||_p, ..., ||g_n||_p)||_p          # per-tensor norms in float32

with one call of the ``compileclip::total_norm`` operator (``norm_op``: one extern kernel
for all the gradients, eager's arithmetic), and appends it as the last graph output. The gradients themselves are left as they are: only
the optimizer step knows whether they are final (compileclip's runtime decides there, and
uses this norm where its records prove it is the norm of the final ``.grad``). With
``unscale``, a ``clip_scale`` placeholder (a GradScaler's scale) is added and the norm is that
of ``g / scale``, as after ``GradScaler.unscale_``. All inserted nodes go before the output node.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from . import norm_op

aten = torch.ops.aten
prims = torch.ops.prims


@dataclasses.dataclass(frozen=True)
class NormInsertion:
    """What ``insert_grad_norm`` changed: how many gradients the norm covers and the names of
    the placeholders it added (``("clip_scale",)`` with ``unscale``, else none)."""

    num_grads: int
    placeholders: tuple[str, ...]
    order: tuple[int, ...] = ()  # with ``parts``: the gradient (index into grad_indices) of each part


class _Builder:
    """Appends nodes before the output node, each with ``meta["val"]`` computed under the
    graph's fake mode (Inductor's lowering reads it)."""

    def __init__(self, gm: fx.GraphModule, fake_mode) -> None:
        self.graph = gm.graph
        self.output = self.graph.output_node() if hasattr(self.graph, "output_node") else next(
            n for n in reversed(self.graph.nodes) if n.op == "output"
        )
        self.fake_mode = fake_mode

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        def val(a):
            return a.meta["val"] if isinstance(a, fx.Node) else a

        with self.fake_mode:
            v = target(
                *[[val(x) for x in a] if isinstance(a, (list, tuple)) else val(a) for a in args],
                **{k: val(a) for k, a in kwargs.items()},
            )
        with self.graph.inserting_before(self.output):
            node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta["val"] = v
        return node


def insert_grad_norm(gm: fx.GraphModule, grad_indices: Sequence[int], norm_type: float, *, unscale: bool = False,
                     parts: bool = False) -> NormInsertion:
    """Append the float32 ``norm_type``-norm of the outputs at ``grad_indices`` of ``gm`` as
    one more output (see the module docstring). With no gradients the norm is 0, so the
    calling convention does not depend on the graph. ``parts``: also append the norm of each
    gradient (1-D float32, in the order ``NormInsertion.order`` gives as indices into
    ``grad_indices``), from the same operator call (``total_norm_parts``)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    if fake_mode is None:
        raise RuntimeError("insert_grad_norm needs a graph traced with FakeTensor values")
    b = _Builder(gm, fake_mode)
    outputs = list(b.output.args[0])
    grads = [outputs[i] for i in grad_indices]
    if any(not isinstance(g, fx.Node) for g in grads):
        raise ValueError(f"grad_indices {list(grad_indices)} select outputs that are not tensors")
    device = grads[0].meta["val"].device if grads else torch.device("cpu")
    names = ("clip_scale",) if unscale else ()
    inv = None
    if unscale:
        with graph.inserting_after(placeholders[-1]):
            scale = graph.placeholder("clip_scale")
        with fake_mode:
            scale.meta["val"] = torch.empty((), dtype=torch.float32, device=device)
        # GradScaler.unscale_'s inverse: reciprocal in float64, then float32
        scale64 = b(prims.convert_element_type.default, scale, torch.float64)
        inv = b(prims.convert_element_type.default, b(aten.reciprocal.default, scale64), torch.float32)
    if grads:
        # one extern call per (device, dtype) group of gradients (see norm_op)
        p = float(norm_type)
        totals, pieces, order = [], [], []
        for pos in norm_op.group_positions([g.meta["val"] for g in grads]):
            order.extend(pos)
            if parts:
                both = b(norm_op.TOTAL_NORM_PARTS, [grads[i] for i in pos], p, inv)
                t = b(operator.getitem, both, 0)
                piece = b(operator.getitem, both, 1)
                if grads[pos[0]].meta["val"].device != device:
                    piece = b(aten._to_copy.default, piece, device=device)
                pieces.append(piece)
            else:
                t = b(norm_op.TOTAL_NORM, [grads[i] for i in pos], p, inv)
            if grads[pos[0]].meta["val"].device != device:
                t = b(aten._to_copy.default, t, device=device)
            totals.append(t)
        total = norm_op.combine_nodes(
            totals, p,
            power=lambda x, e: b(aten.pow.Tensor_Scalar, x, e),
            add=lambda x, y: b(aten.add.Tensor, x, y),
            maximum=lambda x, y: b(aten.maximum.default, x, y),
            root=lambda x, e: b(aten.pow.Tensor_Scalar, x, 1.0 / e),
        )
    else:
        total = b(aten.full.default, [], 0.0, dtype=torch.float32, device=device, pin_memory=False)
        order, pieces = [], [b(aten.empty.memory_format, [0], dtype=torch.float32, device=device, pin_memory=False)]
    extra = (total,)
    if parts:
        extra += (pieces[0] if len(pieces) == 1 else b(aten.cat.default, pieces),)
    b.output.args = (tuple(outputs) + extra,)
    desc = b.output.meta.get("desc")
    if isinstance(desc, (list, tuple)):
        b.output.meta["desc"] = [*desc, *[None] * len(extra)]
    graph.lint()
    gm.recompile()
    return NormInsertion(len(grads), names, tuple(order))
