"""float64 and complex parameters: eager ``clip_grad_norm_`` takes their norms in float64 (the
real dtype of a complex gradient) and returns a float64 total for float64 gradients, and so does
the clip (``ops.norm_dtype``). Model compiled with the clip (eager step) and ``compile_step``,
against eager with the model through plain ``torch.compile`` (the control of Inductor's own
rounding), the clip active and inactive, several steps (``harness.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from harness import ACTIVE, INACTIVE, compare_with_eager, isolated, step_compiled  # noqa: F401


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def loop(models, opts, clip, steps, i):
    (model,), (opt,), (step,) = models, opts, steps
    dtype = next(model.parameters()).dtype
    opt.zero_grad(set_to_none=True)
    model(torch.randn(6, 8, dtype=torch.float64 if dtype == torch.float64 else torch.float32)).square().mean().backward()
    step()


def mlp64():
    return [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()]


def mixed():
    """A float32 trunk and a float64 head: eager stacks float32 and float64 norms (float64)."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.head = nn.Linear(8, 16), nn.Linear(16, 4).double()

        def forward(self, x):
            return self.head(torch.tanh(self.trunk(x)).double())
    return [Mixed()]


class Complex(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out((x.to(torch.complex64) @ self.w).abs())


def sgd(models):
    return [torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9)]


@pytest.mark.parametrize("make", [mlp64, mixed, lambda: [Complex()]], ids=["float64", "float32_and_float64", "complex64"])
def test_model_compiled_with_the_clip(max_norm, make):
    compare_with_eager(loop, make, sgd, max_norm=max_norm, reference_compile={}, tol="bitwise")


@pytest.mark.parametrize("make", [mlp64, mixed], ids=["float64", "float32_and_float64"])
def test_compiled_step(max_norm, make):
    # the compiled SGD update against eager's: plain torch.compile(opt.step) differs from the
    # eager step by up to 2.8e-17 on float64 (measured), inside assert_close's float64 tolerance
    compare_with_eager(loop, make, sgd, step_compiled(compile_model=True), max_norm=max_norm, reference_compile={})


def test_fused_optimizer(max_norm):
    # a fused kernel's grad_scale is float32: folding the coefficient into it would be 1e-8 off
    # eager's float64 coefficient, so float64 gradients are scaled as eager scales them
    def fused(models):
        return [torch.optim.AdamW(models[0].parameters(), lr=1e-2, fused=True)]
    side = compare_with_eager(loop, mlp64, fused, max_norm=max_norm, reference_compile={}, tol="bitwise")
    assert side.clip.stats.get("scale_folded", 0) == 0 and side.clip.stats["step_eager"] > 0


def test_compiled_step_total_of_mixed_dtypes_is_eagers():
    """An eager model and ``compile_step``: the step graph takes the norm of float32 and float64
    gradients itself, every gradient's norm stacked in eager's order (``clipmath.step_groups``),
    so its total is eager's ``clip_grad_norm_`` bit for bit (not a norm of per-group totals)."""
    from harness import new_clip

    for max_norm in (ACTIVE, INACTIVE):
        torch.manual_seed(0)
        (model,) = mixed()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        clip = new_clip(max_norm=max_norm)
        step = clip.compile_step(opt)
        for i in range(4):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(6, 8)).square().mean().mul(1e3).backward()
            ref = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], 2.0)
            step()
            if i > 0:  # the first step clips eagerly, before the graph is compiled
                assert clip.stats["step_in_graph"] >= i
            assert clip.total_norm.dtype == torch.float64 and torch.equal(clip.total_norm, ref), (i, clip.total_norm, ref)
