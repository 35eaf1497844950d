"""The total norm of many gradients as one operator: ``compileclip::total_norm``.

The graph passes insert one call of this operator per graph, whatever the number of
gradients, instead of one reduction per gradient. Inductor does not look inside a custom
operator: it calls it as one extern kernel (0 loop nests of its own), after the gradients it
reads are materialized. So:

- **Constant kernel count.** The clip adds one extern call and a few scalar kernels per graph,
  for 16 tensors as for 1024.
- **Eager's numbers.** The operator runs the same arithmetic as eager ``clip_grad_norm_``: one
  ``torch._foreach_norm`` per (device, dtype) group, then the norm of the stacked norms. On CUDA
  ``_foreach_norm`` is a multi-tensor-apply kernel (a constant number of launches for all the
  tensors of a group); on CPU it loops over the tensors in C++. It reads the gradients as they
  are stored (bf16 ones after their rounding), where an Inductor-generated reduction fused into
  the producer could read the value before rounding.

``inv_scale`` (a GradScaler's inverse scale) multiplies the gradients first, in their dtype, as
``GradScaler.unscale_`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch


def per_tensor_norms(grads: Sequence[torch.Tensor], norm_type: float, device: torch.device) -> list[torch.Tensor]:
    """``||g||_p`` of each gradient in float32, on ``device``: one ``_foreach_norm`` per
    (device, dtype) group."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for (dev, _), gs in groups.items():
        if dev.type in ("cpu", "cuda", "xpu"):
            ns = torch._foreach_norm(gs, norm_type, dtype=torch.float32)
        else:
            ns = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in gs]
        norms.extend(n if n.device == device else n.to(device) for n in ns)
    return norms


def combine(norms: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of a set of gradients from the norms of its parts (eager's norm of norms)."""
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def _unscaled(grads: Sequence[torch.Tensor], inv_scale: torch.Tensor) -> list[torch.Tensor]:
    groups: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.device, []).append(i)
    out: list = [None] * len(grads)
    for dev, idx in groups.items():
        for i, u in zip(idx, torch._foreach_mul([grads[i] for i in idx], inv_scale.to(dev))):
            out[i] = u
    return out


@torch.library.custom_op("compileclip::total_norm", mutates_args=())
def total_norm(grads: list[torch.Tensor], norm_type: float, inv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float32 ``norm_type``-norm of all of ``grads`` (times ``inv_scale`` when given), on
    the first gradient's device, as eager ``clip_grad_norm_`` computes it."""
    if not grads:
        raise ValueError("compileclip::total_norm needs at least one gradient")
    if inv_scale is not None:
        grads = _unscaled(grads, inv_scale)
    return combine(per_tensor_norms(grads, norm_type, grads[0].device), norm_type).to(torch.float32)


@total_norm.register_fake
def _(grads, norm_type, inv_scale=None):
    return grads[0].new_empty((), dtype=torch.float32)


TOTAL_NORM = torch.ops.compileclip.total_norm.default  # the OpOverload the passes insert
