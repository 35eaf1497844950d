"""The total norm of many gradients as one operator: ``compileclip::total_norm``.

The graph passes insert one call of this operator per graph, whatever the number of
gradients, instead of one reduction per gradient. Inductor does not look inside a custom
operator: it calls it as one extern kernel (0 loop nests of its own), after the gradients it
reads are materialized. So:

- **Constant kernel count.** The clip adds one extern call per (device, dtype) group of
  gradients and a few scalar kernels per graph,
  for 16 tensors as for 1024.
- **Eager's numbers.** The operator runs the same arithmetic as eager ``clip_grad_norm_``: one
  ``torch._foreach_norm`` per (device, dtype) group, then the norm of the stacked norms. On CUDA
  ``_foreach_norm`` is a multi-tensor-apply kernel (a constant number of launches for all the
  tensors of a group); on CPU it loops over the tensors in C++. It reads the gradients as they
  are stored (bf16 ones after their rounding), where an Inductor-generated reduction fused into
  the producer could read the value before rounding.

``inv_scale`` (a GradScaler's inverse scale) multiplies the gradients first, in their dtype, as
``GradScaler.unscale_`` does. Gradients of several devices or dtypes are normed one group per
call (``group_positions``), and the group norms combined in the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import operator

import torch

_device_of = operator.attrgetter("device")
_dtype_of = operator.attrgetter("dtype")


def _groups(grads: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """The gradients by (device, dtype), in order; one group without a loop in Python when
    they all share both (the common case)."""
    keys = set(zip(map(_device_of, grads), map(_dtype_of, grads)))
    if len(keys) == 1:
        return {keys.pop(): list(grads)}
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return groups


def _norms(gs: list[torch.Tensor], norm_type: float, dev: torch.device) -> list[torch.Tensor]:
    if dev.type in ("cpu", "cuda", "xpu"):
        return list(torch._foreach_norm(gs, norm_type, dtype=torch.float32))
    return [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in gs]


def per_tensor_norms(grads: Sequence[torch.Tensor], norm_type: float, device: torch.device) -> list[torch.Tensor]:
    """``||g||_p`` of each gradient in float32, on ``device``: one ``_foreach_norm`` per
    (device, dtype) group."""
    norms: list[torch.Tensor] = []
    for (dev, _), gs in _groups(grads).items():
        ns = _norms(gs, norm_type, dev)
        norms.extend(ns if dev == device else [n.to(device) for n in ns])
    return norms


def combine(norms: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of a set of gradients from the norms of its parts (eager's norm of norms)."""
    try:
        stacked = torch.stack(list(norms))
    except RuntimeError:  # parts on several devices
        device = norms[0].device
        stacked = torch.stack([n.to(device) for n in norms])
    return torch.linalg.vector_norm(stacked, norm_type)


def group_positions(vals: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of ``vals`` (example values of the gradients) by (device, dtype): the graph
    passes call the operator once per group, decided at compile time."""
    if any(v is None for v in vals):  # no example values: one group
        return [list(range(len(vals)))]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, v in enumerate(vals):
        groups.setdefault((v.device, v.dtype), []).append(i)
    return list(groups.values())


def total_norm(grads: Sequence[torch.Tensor], norm_type: float, inv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float32 ``norm_type``-norm of all of ``grads`` (times ``inv_scale`` when given), as
    eager ``clip_grad_norm_`` computes it. ``grads`` share one device (the graph passes call it
    once per (device, dtype) group), so nothing here runs per gradient in Python: one
    ``_foreach_norm``, one ``stack``, one ``vector_norm``."""
    if not grads:
        raise ValueError("compileclip::total_norm needs at least one gradient")
    if inv_scale is not None:
        grads = torch._foreach_mul(list(grads), inv_scale.to(grads[0].device))
    return combine(_norms(list(grads), norm_type, grads[0].device), norm_type).to(torch.float32)


# Registered with torch.library's low-level API: ``torch.library.custom_op`` wraps the call in
# an autograd.Function and checks its arguments, which cost 0.4-0.6 ms per call for 512
# gradients on the development CPU (measured), more than the arithmetic's own overhead.
_LIB = torch.library.Library("compileclip", "DEF")
_LIB.define("total_norm(Tensor[] grads, float norm_type, Tensor? inv_scale=None) -> Tensor")
_LIB.impl("total_norm", total_norm, "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::total_norm")
def _(grads, norm_type, inv_scale=None):
    return grads[0].new_empty((), dtype=torch.float32)


TOTAL_NORM = torch.ops.compileclip.total_norm.default  # the OpOverload the passes insert


def total_norm_parts(grads: Sequence[torch.Tensor], norm_type: float, inv_scale: Optional[torch.Tensor] = None):
    """``total_norm`` and the per-gradient norms it combined (1-D float32, in ``grads``'
    order): the same arithmetic, for ``per_param_norms=True`` (no second read)."""
    if not grads:
        raise ValueError("compileclip::total_norm_parts needs at least one gradient")
    if inv_scale is not None:
        grads = torch._foreach_mul(list(grads), inv_scale.to(grads[0].device))
    stacked = torch.stack(_norms(list(grads), norm_type, grads[0].device))
    return torch.linalg.vector_norm(stacked, norm_type).to(torch.float32), stacked


_LIB.define("total_norm_parts(Tensor[] grads, float norm_type, Tensor? inv_scale=None) -> (Tensor, Tensor)")
_LIB.impl("total_norm_parts", total_norm_parts, "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::total_norm_parts")
def _(grads, norm_type, inv_scale=None):
    return grads[0].new_empty((), dtype=torch.float32), grads[0].new_empty((len(grads),), dtype=torch.float32)


TOTAL_NORM_PARTS = torch.ops.compileclip.total_norm_parts.default


def combine_nodes(totals: list, norm_type: float, power, add, maximum, root):
    """The norm of several group norms, from graph-building callables (``power(x, p)``,
    ``add``, ``maximum``, ``root(x, p)``): max for inf, else (sum of p-th powers)^(1/p)."""
    if len(totals) == 1:
        return totals[0]
    if norm_type == float("inf"):
        out = totals[0]
        for t in totals[1:]:
            out = maximum(out, t)
        return out
    out = power(totals[0], norm_type)
    for t in totals[1:]:
        out = add(out, power(t, norm_type))
    return root(out, norm_type)


# ``materialize(xs)``: the tensors, computed and stored, as one opaque call. The step pass puts
# AGC's per-unit factors (tiny: one float per output unit) through it, so that Inductor does
# not fuse their row reductions into the loop that updates the same rows in place: its CPU
# backend's outer-loop fusion fails on that (KeyError in ``get_read_expr``, torch 2.13,
# reproduced with a plain torch.compile of ``w.add_(g * f(w, g)); g.copy_(g * f(w, g))``).
# One extern call for all the factors, a multi-tensor kernel on CUDA.
_LIB.define("materialize(Tensor[] xs) -> Tensor[]")
_LIB.impl("materialize", lambda xs: torch._foreach_mul(list(xs), 1.0), "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::materialize")
def _(xs):
    return [x.new_empty(x.shape) for x in xs]


MATERIALIZE = torch.ops.compileclip.materialize.default
