"""The clip's operators, registered with ``torch.library`` under the ``compileclip`` namespace.

Inductor does not look inside a custom operator: it calls it as one extern kernel, after the
tensors it reads are materialized. So the graphs get a constant number of kernels for the norm,
whatever the number of gradients, and the eager clip calls the very same functions:

- ``compileclip::grad_norms(grads, norm_type, inv_scale)``: the norm of each gradient of one
  (device, dtype) group, stacked (1-D; float32, float64 for float64 and complex128:
  ``norm_dtype``): eager ``clip_grad_norm_``'s ``torch._foreach_norm`` (a multi-tensor kernel
  on CUDA, a loop in C++ on CPU). It reads the gradients as they are
  stored (bf16 ones after their rounding), as eager reads ``.grad``. ``inv_scale`` (a
  GradScaler's inverse scale) multiplies them first, in their dtype, as ``GradScaler.unscale_``.
- ``compileclip::total(parts, norm_type)``: the norm of the norms (eager's ``vector_norm`` of
  the stacked norms), where a graph stacks them itself; ``compileclip::power(x, exponent)``:
  ATen's ``x ** exponent`` (a DTensor norm's partial reduction), in a graph.
- ``compileclip::norms_and_total(grads, norm_type, inv_scale)``: those norms and the norm of
  them (eager's ``vector_norm`` of the stacked norms), for a compiled step.
- ``compileclip::threshold(total, state, kind, params)``: an adaptive policy's threshold
  (``compileclip.thresholds``), read-only on its state.
- ``compileclip::materialize(xs)``: the tensors, computed and stored, as one opaque call (see
  below).

Registered with the low-level ``torch.library.Library`` API: ``torch.library.custom_op`` wraps
the call in an ``autograd.Function`` and checks its arguments, which cost 0.4-0.6 ms per call at
512 gradients on the development CPU (measured), more than the arithmetic's own overhead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from . import thresholds

_LIB = torch.library.Library("compileclip", "DEF")


_LOW = (torch.bfloat16, torch.float16)


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a gradient's norm: float32 for float32 and lower precision (accumulated in
    float32 where eager rounds to bf16/fp16), else eager's own: the real dtype of the gradient
    (float64 for float64 and complex128, float32 for complex64)."""
    return torch.float32 if dtype in _LOW else dtype.to_real()


def _foreach_norms(grads: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    dev = grads[0].device
    kw = {"dtype": torch.float32} if grads[0].dtype in _LOW else {}  # otherwise eager's call
    if dev.type in ("cpu", "cuda", "xpu"):
        return list(torch._foreach_norm(grads, norm_type, **kw))
    return [torch.linalg.vector_norm(g, norm_type, **kw) for g in grads]


def grad_norms(grads: Sequence[torch.Tensor], norm_type: float, inv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``norm_type``-norm of each of ``grads`` (one device and dtype), stacked, in
    ``norm_dtype`` of their dtype."""
    if not grads:
        raise ValueError("compileclip::grad_norms needs at least one gradient")
    grads = list(grads)
    if inv_scale is not None:
        grads = torch._foreach_mul(grads, inv_scale.to(grads[0].device))
    return torch.stack(_foreach_norms(grads, norm_type))


_LIB.define("grad_norms(Tensor[] grads, float norm_type, Tensor? inv_scale=None) -> Tensor")
_LIB.impl("grad_norms", grad_norms, "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::grad_norms")
def _(grads, norm_type, inv_scale=None):
    return grads[0].new_empty((len(grads),), dtype=norm_dtype(grads[0].dtype))


GRAD_NORMS = torch.ops.compileclip.grad_norms.default


def total(parts: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The norm of the gradients from their norms (eager: the norm of the stacked norms)."""
    return torch.linalg.vector_norm(parts, norm_type)


_LIB.define("total(Tensor parts, float norm_type) -> Tensor")
_LIB.impl("total", total, "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::total")
def _(parts, norm_type):
    return parts.new_empty(())


# ``total`` in a graph: ATen's ``vector_norm``, as eager's; Inductor's own reduction of a small
# vector differs from it in the last bit for about a quarter of inputs (measured: 85 of 300)
TOTAL = torch.ops.compileclip.total.default


def power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent``, ATen's (Inductor's ``x ** 0.5`` differed from it in the last bit for
    292 of 300 small float32 vectors on the development CPU)."""
    return x ** exponent


_LIB.define("power(Tensor x, float exponent) -> Tensor")
_LIB.impl("power", power, "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::power")
def _(x, exponent):
    return torch.empty_like(x)


POWER = torch.ops.compileclip.power.default


def norms_and_total(grads: Sequence[torch.Tensor], norm_type: float, inv_scale: Optional[torch.Tensor] = None):
    """``grad_norms`` and their ``total``, from one call: a compiled step needs both, and its
    graph then holds no reduction of its own for the norm."""
    parts = grad_norms(grads, norm_type, inv_scale)
    return parts, total(parts, norm_type)


_LIB.define("norms_and_total(Tensor[] grads, float norm_type, Tensor? inv_scale=None) -> (Tensor, Tensor)")
_LIB.impl("norms_and_total", norms_and_total, "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::norms_and_total")
def _(grads, norm_type, inv_scale=None):
    dtype = norm_dtype(grads[0].dtype)
    return grads[0].new_empty((len(grads),), dtype=dtype), grads[0].new_empty((), dtype=dtype)


NORMS_AND_TOTAL = torch.ops.compileclip.norms_and_total.default


def _threshold(total, state, kind, params):
    return thresholds.threshold(kind, params, total, state)


_LIB.define("threshold(Tensor total, Tensor[] state, str kind, float[] params) -> Tensor")
_LIB.impl("threshold", _threshold, "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::threshold")
def _(total, state, kind, params):
    return total.new_empty((), dtype=torch.float32)


THRESHOLD = torch.ops.compileclip.threshold.default

# AGC's per-unit factors (one float per output unit) go through ``materialize`` so that
# Inductor does not fuse their row reductions into the loop that updates the same rows in
# place: its CPU backend's outer-loop fusion fails on that (KeyError in ``get_read_expr``, torch
# 2.13, reproduced with a plain torch.compile of ``w.add_(g * f(w, g)); g.copy_(g * f(w, g))``).
_LIB.define("materialize(Tensor[] xs) -> Tensor[]")
_LIB.impl("materialize", lambda xs: torch._foreach_mul(list(xs), 1.0), "CompositeExplicitAutograd")


@torch.library.register_fake("compileclip::materialize")
def _(xs):
    return [x.new_empty(x.shape) for x in xs]


MATERIALIZE = torch.ops.compileclip.materialize.default
