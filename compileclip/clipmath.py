"""The clip's arithmetic, eagerly, in one place (the graph passes build the same formulas):

    total = ||(||g_1||_p, ..., ||g_n||_p)||_p      per-tensor norms in float32 (passes.norm_op)
    coef  = clamp(max_norm / (total + 1e-6), max=1)
    g_i  *= coef                                   one _foreach_mul_ per device
    g_i   = clamp(g_i, -clip_value, clip_value)    if clip_value is set, after the norm clip

DTensor gradients (FSDP2, tensor parallel) go through torch's own ``get_total_norm`` and
``clip_grads_with_norm_``, which reduce across ranks (sum of p-th powers, MAX for inf) as eager
``clip_grad_norm_`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .passes.agc import agc_factor  # the step graphs trace the same function
from .passes.clip_step import EPS  # eager clip_grad_norm_ adds it to the norm before dividing
from .passes.norm_op import combine, per_tensor_norms  # noqa: F401  (the graphs' arithmetic)


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed
        return False
    return isinstance(t, DTensor)


def sparse_error(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"compileclip: {what} has sparse gradients (nn.Embedding/EmbeddingBag(sparse=True)). "
        "Eager torch.nn.utils.clip_grad_norm_ refuses them too (linalg_vector_norm has no "
        "sparse kernel): use sparse=False, or clip those parameters yourself"
    )


def nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is "
        "non-finite, so it cannot be clipped. To disable this error and scale the "
        "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
    )


def coefficient(max_norm: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return torch.clamp(max_norm / (total + EPS), max=1.0)


def scale_(grads: Sequence[torch.Tensor], coef: torch.Tensor) -> None:
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    for dev, gs in groups.items():
        torch._foreach_mul_(gs, coef.to(dev))


def clamp_values_(grads: Sequence[torch.Tensor], clip_value: float, keep_nonfinite: bool = False) -> None:
    """``clip_grad_value_``; ``keep_nonfinite`` lets inf survive for a later skip decision."""
    if not keep_nonfinite:
        torch._foreach_clamp_min_(list(grads), -clip_value)
        torch._foreach_clamp_max_(list(grads), clip_value)
        return
    for g in grads:
        g.copy_(torch.where(g.abs() < math.inf, g.clamp(-clip_value, clip_value), g))


def dtensor_clip_(params: Sequence[torch.Tensor], threshold_for, norm_type: float, error_if_nonfinite: bool,
                  clip_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager ``clip_grad_norm_`` over DTensor gradients, with torch's own two halves (the norm is
    a DTensor whose reduction across ranks DTensor performs). ``threshold_for(total)`` gives
    the step's threshold from the plain total norm. Returns (the total norm as a plain tensor,
    the same on every rank; the threshold)."""
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, None)
    plain = total.full_tensor() if is_dtensor(total) else total
    thr = threshold_for(plain)
    if clip_norm:
        torch.nn.utils.clip_grads_with_norm_(params, thr, plain, None)
    return plain, thr


def dtensor_param_norms(grads: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of each DTensor gradient (1-D float32, plain, the same on every rank)."""
    norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in grads]
    return torch.stack([n.full_tensor() if is_dtensor(n) else n for n in norms])


def agc_(params: Sequence[torch.Tensor], clipping: float, eps: float) -> None:
    """Unit-wise adaptive gradient clipping (NFNets) of ``params``' gradients, in place."""
    for p in params:
        p.grad.mul_(agc_factor(p.detach(), p.grad, clipping, eps))
