"""The clip of DTensor gradients (FSDP2, HSDP, tensor parallel) through their local shards.

Eager ``clip_grad_norm_`` over DTensors dispatches every op through DTensor: ``_foreach_norm``
gives one partial norm per gradient (``_NormPartial`` on each mesh dimension the gradient is
sharded on), stacked; ``vector_norm`` first makes the stack replicated (``x ** p``, all-reduce
SUM, ``x ** (1 / p)`` on each such mesh dimension; all-reduce MAX for ``inf``), then takes the
norm of the gradients' norms; ``_foreach_mul_`` scales the DTensors. The arithmetic on each rank is the same ops
on the local shards, so this module does exactly that with plain tensors (``total_norm``): one
``_foreach_norm`` per device and dtype, one all-reduce per reduced mesh dimension, and the scale
through the local shards. No DTensor dispatch per tensor, no full or replicated copy of any
gradient (the all-reduced vector has one element per gradient).

Where every gradient does not share one mesh and, on each mesh dimension, one kind of placement
(all sharded, or all replicated), ``reduce_dims`` returns None and the caller uses torch's own
DTensor path (tensor parallel with replicated norms and biases, for example: DTensor
redistributes the stacked norms there, which this module does not reproduce).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def placements_of(grads: Sequence) -> tuple[object, list[tuple]] | None:
    """(the mesh, each gradient's placements as ('shard' | 'replicate' | other, ...)), or None
    when the gradients are not all DTensors on one mesh."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, out = None, []
    for g in grads:
        if not isinstance(g, DTensor):
            return None
        if mesh is None:
            mesh = g.device_mesh
        elif g.device_mesh != mesh:
            return None
        out.append(tuple("shard" if isinstance(pl, Shard) else "replicate" if isinstance(pl, Replicate)
                         else type(pl).__name__ for pl in g.placements))
    return (mesh, out) if mesh is not None else None


def reduce_dims(placements: Sequence[tuple]) -> tuple[int, ...] | None:
    """The mesh dimensions the total norm is reduced over, or None where the local path does not
    reproduce eager's (a dimension sharded for some gradients and replicated for others, a
    partial gradient, more than one sharded dimension: DTensor's reduction order there is its
    own). A pure function of the placements."""
    if not placements:
        return None
    ndim = len(placements[0])
    dims = []
    for d in range(ndim):
        kinds = {pl[d] for pl in placements}
        if kinds == {"shard"}:
            dims.append(d)
        elif kinds != {"replicate"}:
            return None
    return tuple(dims) if len(dims) <= 1 else None


def local_grads(grads: Sequence) -> list[torch.Tensor]:
    """The local shards, as plain tensors (views: scaling them scales the DTensors)."""
    return [g._local_tensor for g in grads]


def total_norm(grads: Sequence, norm_type: float, mesh, dims: Sequence[int]) -> torch.Tensor:
    """Eager's total norm of DTensor ``grads``, as a plain tensor, bit for bit. Eager's
    ``vector_norm`` over the stacked partial norms first makes them replicated (each gradient's
    full norm: ``x ** p``, all-reduce SUM, ``x ** (1 / p)``, elementwise; MAX for ``inf``), then
    takes the norm of norms; so here: each local shard's norm (one ``_foreach_norm`` per device
    and dtype, stacked in eager's order), one all-reduce of that vector per reduced mesh
    dimension, and the norm of the result."""
    import torch.distributed as dist
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    p = float(norm_type)
    local = local_grads(grads)
    first = local[0].device
    norms: list[torch.Tensor] = []
    for (device, _dtype), ([tensors], _) in _group_tensors_by_device_and_dtype([local]).items():
        group_norms = torch._foreach_norm(tensors, p)
        # eager moves each norm to the first device: a no-op on that device, but a dispatch each
        norms.extend(group_norms if device == first else [n.to(first) for n in group_norms])
    stacked = torch.stack(norms)
    for d in dims:
        group = mesh.get_group(d)
        if math.isinf(p):
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=group)
        else:
            stacked = stacked ** p  # _NormPartial's reduction: pre-transform, sum, post-transform
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
            stacked = stacked ** (1.0 / p)
    return torch.linalg.vector_norm(stacked, p)
