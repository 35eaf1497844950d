"""The clip's arithmetic, written once. The eager clip calls these functions on tensors; the step
pass traces ``step_clip`` into a compiled optimizer step (they take ``torch.fx.Proxy`` values as
well: no branch reads a tensor)::

    parts = (||g_1||_p, ..., ||g_n||_p)           per gradient in float32 (ops.grad_norms)
    total = ||parts||_p                             parts in eager's order: the same bits
    coef  = clamp((total + 1e-6)^-1 * max_norm, max=1)
    g_i  *= coef                                    one _foreach_mul_ per (device, dtype)
    g_i   = clamp(g_i, -clip_value, clip_value)    if clip_value is set, after the norm clip

``coef`` is eager's own form: ``clip_grads_with_norm_`` computes ``max_norm / (total + 1e-6)``
with a Python float ``max_norm``, which torch evaluates as a reciprocal and a product. A true
division by a tensor differs by one ulp for about a quarter of the norms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from . import ops

EPS = 1e-6  # eager clip_grad_norm_ adds it to the norm before dividing


def group_positions(vals: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of ``vals`` by (device, dtype), in order of first appearance: one operator call
    per group, decided once (at compile time in a graph)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, v in enumerate(vals):
        groups.setdefault((v.device, v.dtype), []).append(i)
    return list(groups.values())


def eager_order(grads: Sequence[torch.Tensor]) -> list[int] | None:
    """The order in which eager ``get_total_norm`` stacks the per-gradient norms (grouped by
    device and dtype with torch's own helper), or None when it is the given order."""
    if len({(g.device, g.dtype) for g in grads}) <= 1:
        return None
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    grouped = _group_tensors_by_device_and_dtype([list(grads)], with_indices=True)
    return [i for _, (_, idx) in grouped.items() for i in idx]


def step_groups(grads: Sequence[torch.Tensor]) -> list[list[int]]:
    """The positions of a compiled step's gradients (of DTensors, their local shards) per
    (device, dtype), in the order eager ``get_total_norm`` stacks their norms: ``step_clip`` and
    ``shards_total`` stack the norms group after group."""
    groups = group_positions(grads)
    order = eager_order(grads)
    if order is None:
        return groups
    rank = {i: k for k, i in enumerate(order)}
    return sorted(groups, key=lambda pos: rank[pos[0]])


def norms_by_group(grads: Sequence, groups: Sequence[Sequence[int]], norm_type: float, inv_scale=None) -> list:
    """One ``compileclip::grad_norms`` call per group: a 1-D float32 tensor each."""
    return [ops.GRAD_NORMS([grads[i] for i in pos], float(norm_type), inv_scale) for pos in groups]


def grad_norms(grads: Sequence[torch.Tensor], norm_type: float, inv_scale=None) -> torch.Tensor:
    """The norm of each gradient (1-D float32, in ``grads``' order, on the first one's device)."""
    groups = group_positions(grads)
    pieces = norms_by_group(grads, groups, norm_type, inv_scale)
    return stitch(pieces, [i for pos in groups for i in pos], grads[0].device)


def stitch(pieces: Sequence, positions: Sequence[int], device) -> torch.Tensor:
    """The concatenation of the 1-D ``pieces``, element ``k`` of which is the norm of gradient
    ``positions[k]``, put in gradient order on ``device`` (tensors or traced values)."""
    flat = pieces[0] if len(pieces) == 1 else torch.cat([p.to(device) for p in pieces])
    positions = list(positions)
    if positions == list(range(len(positions))):
        return flat
    inverse = [0] * len(positions)
    for k, i in enumerate(positions):
        inverse[i] = k
    return flat[inverse]


total = ops.total  # the norm of the gradients from their norms


def coefficient(total_norm, max_norm):
    """``clamp(max_norm / (total + 1e-6), max=1)`` in eager's own arithmetic."""
    return torch.clamp((total_norm + EPS).reciprocal() * max_norm, max=1.0)


def nonfinite(total_norm):
    """1.0 where the norm is nan or inf (``|x| < inf`` is false for both), as float32."""
    return torch.logical_not(torch.lt(torch.abs(total_norm), math.inf)).to(torch.float32)


def inverse_scale(scale):
    """``GradScaler.unscale_``'s inverse: the reciprocal in float64, rounded to float32."""
    return scale.to(torch.float64).reciprocal().to(torch.float32)


def scale_(grads: Sequence[torch.Tensor], coef: torch.Tensor) -> None:
    """``g *= coef`` in place: one ``_foreach_mul_`` per device (eager's multiply)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for dev, gs in by_device.items():
        torch._foreach_mul_(gs, coef.to(dev))


def clamp_values_(grads: Sequence[torch.Tensor], clip_value: float) -> None:
    """``clip_grad_value_``."""
    torch._foreach_clamp_min_(list(grads), -clip_value)
    torch._foreach_clamp_max_(list(grads), clip_value)


def agc_factor(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float, ndim: int | None = None) -> torch.Tensor:
    """AGC's factor for the gradient ``g`` of ``w`` (in ``g``'s dtype, broadcastable to it): 1
    where a unit's gradient norm is below ``clipping * max(||w_unit||, eps)``, that bound over
    the norm elsewhere; a unit is a slice along dim 0 for ``ndim >= 2``, else the whole tensor,
    norms in float32. ``ndim``: ``w``'s, given when ``w`` is a traced value."""
    ndim = w.ndim if ndim is None else ndim
    if ndim <= 1:
        wn = torch.linalg.vector_norm(w, dtype=torch.float32)
        gn = torch.linalg.vector_norm(g, dtype=torch.float32)
    else:
        dims = tuple(range(1, ndim))
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=torch.float32)
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=torch.float32)
    bound = torch.clamp(wn, min=eps) * clipping
    return torch.where(gn < bound, 1.0, bound / torch.clamp(gn, min=EPS)).to(g.dtype)


def agc_(params: Sequence[torch.Tensor], clipping: float, eps: float) -> None:
    """Unit-wise adaptive gradient clipping (NFNets) of ``params``' gradients, in place."""
    for p in params:
        p.grad.mul_(agc_factor(p.detach(), p.grad, clipping, eps))


def dtensor_total(grads: Sequence, norm_type: float):
    """The total norm as one reduction per gradient: for DTensor gradients (FSDP2), whose
    sharding DTensor propagates through these ops (it has no strategy for ``grad_norms``)."""
    p = float(norm_type)
    parts = []
    for g in grads:
        g = g.to(ops.norm_dtype(g.dtype))
        if math.isinf(p):
            parts.append(torch.amax(torch.abs(g)))
        elif p == 2.0:
            parts.append(torch.sum(g * g))
        else:
            parts.append(torch.sum(torch.pow(torch.abs(g), p)))
    out = parts[0]
    for part in parts[1:]:
        out = torch.maximum(out, part) if math.isinf(p) else out + part
    if math.isinf(p) or p == 1.0:
        return out
    return torch.sqrt(out) if p == 2.0 else torch.pow(out, 1.0 / p)


def _replicated(mesh):
    """``local -> DTensor.from_local(local, mesh, Replicate() on every dim)``: one call in a
    traced graph (its target; the mesh is no graph argument)."""
    def replicated(local):
        from torch.distributed.tensor import DTensor, Replicate

        return DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated


def shards_total(grads: Sequence, spec: StepClipSpec):
    """The total norm of DTensor gradients in a compiled step, through their local shards, as
    ``shards.total_norm`` computes it eagerly: one ``grad_norms`` per device and dtype, one
    all-reduce per reduced mesh dimension (functional collectives), the norm of the result,
    made a replicated DTensor for the update's DTensor ops. A constant number of kernels."""
    p = float(spec.norm_type)
    local = [g.to_local() for g in grads]
    pieces = [ops.GRAD_NORMS([local[i] for i in pos], p, None) for pos in spec.groups]
    stacked = pieces[0] if len(pieces) == 1 else torch.cat([x.to(spec.device) for x in pieces])
    for name in spec.shard_groups:
        if math.isinf(p):
            stacked = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(stacked, "max", name))
        else:
            summed = torch.ops._c10d_functional.all_reduce(ops.POWER(stacked, p), "sum", name)
            stacked = ops.POWER(torch.ops._c10d_functional.wait_tensor(summed), 1.0 / p)
    tot = ops.TOTAL(stacked, p)
    if isinstance(tot, torch.fx.Proxy):  # traced: one node that makes the DTensor
        return tot.tracer.create_proxy("call_function", spec.replicate, (tot,), {})
    return spec.replicate(tot)


@dataclasses.dataclass(frozen=True)
class StepClipSpec:
    """What ``step_clip`` computes, fixed when a step graph is compiled."""

    norm_type: float
    groups: tuple[tuple[int, ...], ...]  # gradient positions per (device, dtype)
    device: torch.device  # where the total norm lives
    devices: tuple[torch.device, ...]  # each gradient's device
    ndims: tuple[int, ...] = ()  # each gradient's number of dimensions (AGC's units)
    clip_norm: bool = True  # scale by the norm (else only compute it: skip or monitoring)
    compute_norm: bool = True
    clip_value: bool = False
    unscale: bool = False
    given_norm: bool = False
    dtensor: bool = False
    policy: tuple[str, tuple[float, ...]] | None = None
    agc: tuple[float, float] | None = None
    parts: bool = False
    # DTensor gradients whose norm the local shards give (``shards.reduce_dims``): the process
    # group of each reduced mesh dimension, and the function that replicates the total
    shard_groups: tuple[str, ...] | None = None
    replicate: object = None
    norm_dtype: torch.dtype = torch.float32  # of the total norm (float64 for float64 gradients)


def _on(x, dev, spec: StepClipSpec):
    return x if dev == spec.device else x.to(dev)


def step_clip(grads: list, inp: dict, spec: StepClipSpec, params: list | None = None) -> tuple[list, dict]:
    """The clip of a compiled optimizer step, functional: ``(clipped gradients, outputs)``.

    ``inp``: ``max_norm``, ``enabled`` (0-d bool; false: coefficient 1, the step's gradients
    were clipped before it), and where the spec says so ``clip_value``, ``scale`` (a
    GradScaler's, divided out first), ``total_norm`` (given: the gradients are not read for the
    norm) and ``state`` (a policy's statistics, read only). ``params``: the parameter of each
    gradient, for AGC. Outputs: ``total_norm`` (unless given), ``nonfinite``, and
    ``threshold`` / ``param_norms`` for a policy / ``parts``."""
    out: dict = {}
    clipped = list(grads)
    inv = None
    if spec.unscale:
        inv = inverse_scale(inp["scale"])
        clipped = [g * _on(inv, d, spec) for g, d in zip(grads, spec.devices)]
    tot = None
    if spec.given_norm:
        tot = inp["total_norm"]
    elif spec.compute_norm:
        if spec.dtensor and spec.shard_groups is not None and not spec.unscale:
            tot = shards_total(clipped, spec)
        elif spec.dtensor:
            tot = dtensor_total(clipped, spec.norm_type)
        else:
            both = [ops.NORMS_AND_TOTAL([grads[i] for i in pos], float(spec.norm_type), inv) for pos in spec.groups]
            if len(both) == 1:  # the common case
                tot = both[0][1]
            else:  # every gradient's norm, stacked in eager's order (``step_groups``), promoted
                tot = ops.TOTAL(torch.cat([b[0].to(spec.device) for b in both]), float(spec.norm_type))
            if spec.parts:
                out["param_norms"] = stitch([b[0] for b in both], [i for pos in spec.groups for i in pos], spec.device)
        out["total_norm"] = tot
    if tot is not None:
        out["nonfinite"] = nonfinite(tot)
    max_norm = inp.get("max_norm")
    if spec.policy is not None:
        plain = tot.to_local() if spec.dtensor else tot
        max_norm = out["threshold"] = ops.THRESHOLD(plain, inp["state"], spec.policy[0], list(spec.policy[1]))
    enabled = inp["enabled"]
    if spec.agc is not None:
        factors = ops.MATERIALIZE([agc_factor(w, u, *spec.agc, ndim=n) for u, w, n in zip(clipped, params, spec.ndims)])
        clipped = [u * torch.where(_on(enabled, d, spec), factors[i], 1.0)
                   for i, (u, d) in enumerate(zip(clipped, spec.devices))]
    elif spec.clip_norm:
        coef = torch.where(enabled, coefficient(tot, max_norm), 1.0)
        clipped = [u * _on(coef, d, spec) for u, d in zip(clipped, spec.devices)]
    if spec.clip_value:
        # also with enabled=False: a clamp applied twice is the clamp applied once
        bound = inp["clip_value"]
        clipped = [torch.minimum(torch.maximum(u, _on(-bound, d, spec)), _on(bound, d, spec))
                   for u, d in zip(clipped, spec.devices)]
    return clipped, out
