"""Insert gradient-norm clipping into a partitioned backward graph.

The rewrite mirrors ``torch.nn.utils.clip_grad_norm_``::

    total = ||(||g_1||_p, ..., ||g_n||_p)||_p          # accumulated in float32
    coef  = clamp(max_norm / (total + 1e-6), max=1)
    g_i   = g_i * coef

with two runtime inputs added as the last placeholders, so that neither needs a recompile:
``clip_max_norm`` (0-d float32) and ``clip_enabled`` (0-d bool; when false the coefficient is
exactly 1 and the gradients pass through bit for bit). The total norm is appended as the last
graph output. Only aten/prims ops that Inductor lowers are inserted; all of them go before
the output node, and Inductor's scheduler places and fuses them (on CPU it puts the norms and
the scales of all gradients into one C++ function at the end of the backward). Placing each
partial norm right after its gradient's producer was tried: the backward got slightly
faster, but the optimizer step after it slower (4-layer 1024-wide MLP, CPU), so it was
dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ._common import EPS, add_scalar_placeholders, runtime_input_names

aten = torch.ops.aten
prims = torch.ops.prims



@dataclasses.dataclass(frozen=True)
class ClipInsertion:
    """What ``insert_grad_norm_clip`` changed: how many gradients it clips and the names of
    the placeholders it added, in the order the caller passes them (``clip_max_norm``,
    ``clip_enabled``, then ``clip_value`` and ``clip_scale`` where requested)."""

    num_grads: int
    placeholders: tuple[str, ...]


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


def _partial_norm(b: _Builder, g: fx.Node, p: float, inv: fx.Node | None = None) -> fx.Node:
    """sum(|g|^p) (or max |g| for p = inf) of one gradient (times ``inv``), in float32."""
    if inv is not None:  # unscale in the gradient's dtype, as GradScaler.unscale_ does
        g = b(aten.mul.Tensor, g, inv)
    if g.meta["val"].dtype != torch.float32:
        g = b(prims.convert_element_type.default, g, torch.float32)
    if math.isinf(p):
        return b(aten.amax.default, b(aten.abs.default, g), [])
    if p == 2.0:
        return b(aten.sum.default, b(aten.mul.Tensor, g, g))
    a = b(aten.abs.default, g)
    return b(aten.sum.default, a if p == 1.0 else b(aten.pow.Tensor_Scalar, a, p))


def insert_grad_norm_clip(
    gm: fx.GraphModule,
    grad_indices: Sequence[int],
    norm_type: float,
    *,
    guard_nonfinite: bool = False,
    clip_norm: bool = True,
    clip_value: bool = False,
    unscale: bool = False,
    norm_only: bool = False,
    keep_nonfinite: bool = False,
) -> ClipInsertion:
    """Clip the outputs at ``grad_indices`` of ``gm`` by their joint ``norm_type``-norm.

    ``guard_nonfinite`` leaves the gradients unscaled when the total norm is nan/inf (for
    ``error_if_nonfinite=True``, where the caller raises afterwards, as eager does before
    it scales anything). ``clip_norm=False`` skips the norm (the norm output is 0).
    ``clip_value`` adds a ``clip_value`` placeholder (0-d float32, > 0) and clamps every
    element of the (norm-clipped) gradients to ``[-clip_value, clip_value]``.
    ``unscale`` adds a ``clip_scale`` placeholder (0-d float32, a GradScaler's scale): the
    gradients are still multiplied by it, so the norm is taken of ``g / scale`` and the value
    bound is ``clip_value * scale``; the outputs stay scaled for ``GradScaler.step``.
    ``norm_only`` computes the norm but leaves the gradients as they are (a compiled
    optimizer step applies the clip, with this norm as its input).
    ``keep_nonfinite`` leaves inf elements out of the value clamp, so that a later inf/nan
    check (``GradScaler.unscale_``, or a compiled step's skip) still sees them: a clamp would
    turn inf into ``clip_value`` and hide the overflow that eager detects before clamping.
    Returns what was inserted; with no gradients it still adds the placeholders and a zero
    norm so the calling convention does not depend on the graph.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    if fake_mode is None:
        raise RuntimeError("insert_grad_norm_clip needs a graph traced with FakeTensor values")
    b = _Builder(gm, fake_mode)
    outputs = list(b.output.args[0])
    grads = [outputs[i] for i in grad_indices]
    if any(not isinstance(g, fx.Node) for g in grads):
        raise ValueError(f"grad_indices {list(grad_indices)} select outputs that are not tensors")
    device = grads[0].meta["val"].device if grads else torch.device("cpu")

    names = runtime_input_names(clip_value=clip_value, unscale=unscale)
    added = add_scalar_placeholders(graph, placeholders[-1], names, fake_mode, device, "val")
    max_norm, enabled = added["clip_max_norm"], added["clip_enabled"]

    def full(value: float) -> fx.Node:
        return b(aten.full.default, [], value, dtype=torch.float32, device=device, pin_memory=False)

    p = float(norm_type)
    inv = None
    if unscale:
        # GradScaler.unscale_'s inverse: reciprocal in float64, then float32
        scale64 = b(prims.convert_element_type.default, added["clip_scale"], torch.float64)
        inv = b(prims.convert_element_type.default, b(aten.reciprocal.default, scale64), torch.float32)
    total = None
    if grads and clip_norm:
        partials = [_partial_norm(b, g, p, inv) for g in grads]
        # a chain of pointwise ops on 0-d tensors, which Inductor fuses into one kernel
        # (aten.stack has no lowering, only a decomposition)
        combine = aten.maximum.default if math.isinf(p) else aten.add.Tensor
        total = partials[0]
        for part in partials[1:]:
            total = b(combine, total, part)
        if not math.isinf(p):
            if p == 2.0:
                total = b(aten.sqrt.default, total)
            elif p != 1.0:
                total = b(aten.pow.Tensor_Scalar, total, 1.0 / p)
    if total is not None and not norm_only:
        coef = b(aten.div.Tensor, max_norm, b(aten.add.Tensor, total, EPS))
        coef = b(aten.clamp_max.default, coef, 1.0)
        one = full(1.0)
        if guard_nonfinite:
            # |total| < inf is false for nan and inf (aten.isfinite has no Inductor lowering)
            finite = b(aten.lt.Scalar, b(aten.abs.default, total), math.inf)
            coef = b(aten.where.self, finite, coef, one)
        coef = b(aten.where.self, enabled, coef, one)
        for i, g in zip(grad_indices, grads):
            outputs[i] = b(aten.mul.Tensor, g, coef)
    if grads and clip_value and not norm_only:
        bound = added["clip_value"]
        if unscale:
            bound = b(aten.mul.Tensor, bound, added["clip_scale"])
        low = b(aten.neg.default, bound)
        for i in grad_indices:
            g = outputs[i]
            clamped = b(aten.minimum.default, b(aten.maximum.default, g, low), bound)
            if keep_nonfinite:  # |g| < inf is false for inf (and nan, which clamps to nan)
                clamped = b(aten.where.self, b(aten.lt.Scalar, b(aten.abs.default, g), math.inf), clamped, g)
            outputs[i] = b(aten.where.self, enabled, clamped, g)
    if total is None:
        total = full(0.0)

    b.output.args = (tuple(outputs) + (total,),)
    desc = b.output.meta.get("desc")
    if isinstance(desc, (list, tuple)):
        b.output.meta["desc"] = [*desc, None]
    graph.lint()
    gm.recompile()
    return ClipInsertion(len(grads), tuple(added[n].name for n in names))
