"""Compare a model compiled with ``clip_backend`` against eager ``clip_grad_norm_``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from compileclip import clip_backend

ACTIVE = 1e-2  # every model here has a pre-clip gradient norm well above this
INACTIVE = 1e6  # ... and well below this


def from_backward(steps: int, graphs: int = 1) -> dict:
    """The counters of ``steps`` eager optimizer steps of a model compiled with the clip, each
    after one backward of ``graphs`` graphs whose norms the step used."""
    return {"backward_graph_runs": steps * graphs, "step_eager": steps, "norm_from_backward": steps}


def assert_clip_state(ref_norm: torch.Tensor, max_norm: float) -> None:
    """Keep the tests honest: 'active' must really scale, 'inactive' must not."""
    if math.isfinite(float(ref_norm)):
        assert (float(ref_norm) > max_norm) == (max_norm == ACTIVE), (float(ref_norm), max_norm)


def zero_grads(*models: torch.nn.Module) -> None:
    for m in models:
        for p in m.parameters():
            p.grad = None


def eager_clip(model: torch.nn.Module, max_norm: float, norm_type: float, reference_dtype) -> torch.Tensor:
    """Eager clip_grad_norm_, with the norm of low-precision grads taken in reference_dtype."""
    params = [p for p in model.parameters() if p.grad is not None]
    if reference_dtype is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    grads = [p.grad.to(reference_dtype) for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p, g in zip(params, grads):
        p.grad.copy_(g * coef)
    return total


def compare_with_eager(
    make_model: Callable[[], torch.nn.Module],
    make_input: Callable[[int], tuple],
    loss_fn: Callable[..., torch.Tensor] = lambda out: out.float().pow(2).mean(),
    *,
    max_norm: float = ACTIVE,
    norm_type: float = 2.0,
    steps: int = 2,
    dtype: torch.dtype | None = None,
    reference_dtype: torch.dtype | None = None,
    compile_kwargs: dict | None = None,
    backend_kwargs: dict | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    expect_stats: dict | None = None,
    check_clip_state: bool = True,
    equal_nan: bool = False,
    compiled_reference: bool = False,
):
    """Train a compiled copy and an eager copy for ``steps`` SGD steps on the same fresh
    random inputs, asserting every gradient, the total norm and the parameters after each
    step. Returns the backend so callers can check which path ran. ``compiled_reference``
    runs the reference through plain ``torch.compile`` (Inductor, no clip) before its eager
    ``clip_grad_norm_``: Inductor's own rounding then cancels, and only the clip is compared."""
    torch.manual_seed(0)
    model = make_model()
    if dtype is not None:
        model = model.to(dtype)
    ref = copy.deepcopy(model)
    ref_forward = torch.compile(ref, **(compile_kwargs or {})) if compiled_reference else ref
    clip = clip_backend(max_norm=max_norm, norm_type=norm_type, **(backend_kwargs or {}))
    compiled = torch.compile(model, backend=clip, **(compile_kwargs or {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    tol = {"equal_nan": equal_nan} if rtol is None else {"rtol": rtol, "atol": atol, "equal_nan": equal_nan}
    for step in range(steps):
        torch.manual_seed(1000 + step)
        inputs = make_input(step)
        zero_grads(model, ref)
        loss_fn(compiled(*inputs)).backward()
        loss_fn(ref_forward(*inputs)).backward()
        ref_norm = eager_clip(ref, max_norm, norm_type, reference_dtype)
        if check_clip_state:
            assert_clip_state(ref_norm, max_norm)
        opt.step()  # the clip runs here, as eager's right before the step
        ref_opt.step()
        # .grad after the step is what the optimizer consumed (SGD leaves it as it was given)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"step {step} grad of {name}: {m}")
        torch.testing.assert_close(
            clip.total_norm, ref_norm.to(torch.float32), **tol,
            msg=lambda m: f"step {step} total norm: {m}",
        )
        assert clip.total_norm.dtype == torch.float32 and clip.total_norm.dim() == 0
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **tol, msg=lambda m: f"step {step} param {name}: {m}")
    if expect_stats is not None:
        assert {k: v for k, v in clip.stats.items() if v} == expect_stats, clip.stats
    return clip
