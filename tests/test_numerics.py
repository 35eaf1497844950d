"""Numerics of the clip against eager ``clip_grad_norm_`` (``harness.py``, the loop of
``test_models.py``): norm types, bf16/fp16 parameters, the float32 norm, dynamic shapes, zero
and non-finite gradients (``error_if_nonfinite`` too), a ``max_norm`` tensor changed between
steps, and random small MLPs drawn by hypothesis."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

import models as zoo
from harness import (ACTIVE, INACTIVE, EagerClip, Step, compare, compare_with_eager, compiled_side, eager_side,  # noqa: F401
                     isolated, new_clip, train, whole_model)
from test_models import ITERATIONS, from_backward, sgd, supervised, taken


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.5, 3.5, "inf"])
def test_norm_types(norm_type, max_norm):
    p = math.inf if norm_type == "inf" else norm_type
    side = compare_with_eager(supervised(zoo.mlp_input), lambda: [zoo.mlp()], sgd, norm_type=p, max_norm=max_norm)
    assert taken(side.clip) == from_backward(), side.clip.stats


class Float32NormClip:
    """The reference for bf16/fp16 gradients: eager ``clip_grad_norm_``'s arithmetic with the
    total norm taken in float32, as the clip takes it (``test_norm_accumulates_in_float32``;
    eager's own norm of bf16/fp16 gradients is a bf16/fp16 value), the gradients scaled in
    float32 and rounded back to their dtype."""

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.max_norm, self.norm_type = max_norm, norm_type

    def clip_(self, params) -> torch.Tensor:
        grads = [p.grad.float() for p in params]
        total = torch.nn.utils.get_total_norm(grads, self.norm_type)
        coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        for p, g in zip(params, grads):
            p.grad.copy_(g * coef)
        return total


# bf16/fp16: the compiled and the eager model differ in rounding of intermediates (Inductor
# computes pointwise ops in fp32 and rounds once; eager rounds after every op). The reference
# is therefore the same model under plain torch.compile, clipped eagerly with a float32 norm.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters(dtype, max_norm):
    """Against plain torch.compile + ``Float32NormClip``, bitwise. The compiled reference cancels
    Inductor's own rounding: plain torch.compile without any clip differs from eager by up to
    4.9e-4 on these bf16 gradients (torch 2.11 and 2.13), while the clip's gradients, total norm,
    parameters and optimizer state equal the compiled reference's bit for bit, the clip active
    or inactive (measured on torch 2.13; with a float64 reference norm the total norms differ by
    under one float32 ulp, the rest still bitwise). The backward's norm (one
    compileclip::total_norm call) reads the bf16/fp16 gradients as returned, after their
    rounding, so the step uses it; an Inductor reduction fused into the producer would read
    them before rounding (2.9e-5 relative on this model)."""
    side = compare_with_eager(supervised(lambda i: (torch.randn(6, 8, dtype=dtype),)), lambda: [zoo.mlp().to(dtype)],
                              sgd, max_norm=max_norm, reference=Float32NormClip(max_norm), reference_compile={},
                              tol="bitwise")
    assert taken(side.clip) == from_backward(), side.clip.stats


def test_norm_accumulates_in_float32():
    """fp16 gradients of 30000 each (representable) whose norm, 120000, is not: eager's
    fp16 norm overflows to inf, ours is the float32 value."""
    model = nn.Linear(4, 4, bias=False).to(torch.float16)
    clip = new_clip(max_norm=1.0)
    compiled = torch.compile(model, backend=clip)
    x = torch.full((1, 4), 300.0, dtype=torch.float16)
    (compiled(x).float() * 100).sum().backward()  # d/dW = 100 * x = 30000 everywhere
    torch.optim.SGD(model.parameters(), lr=0.0).step()  # the clip runs at the step
    assert clip.total_norm.dtype == torch.float32
    torch.testing.assert_close(clip.total_norm, torch.tensor(120000.0))
    assert math.isinf(float(torch.linalg.vector_norm(torch.full((4, 4), 3e4, dtype=torch.float16))))
    torch.testing.assert_close(model.weight.grad, torch.full((4, 4), 30000 / 120000.0, dtype=torch.float16))


def test_dynamic_shapes_no_recompile(max_norm):
    sizes = [4, 7, 9, 5]  # a batch size per iteration, the same on both sides
    with torch._dynamo.config.patch(error_on_recompile=True):
        side = compare_with_eager(supervised(lambda i: (torch.randn(sizes[i], 8),)), lambda: [zoo.mlp()], sgd,
                                  whole_model(dynamic=True), max_norm=max_norm, iterations=len(sizes))
    assert taken(side.clip) == from_backward(len(sizes)), side.clip.stats


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_zero_gradients(inner):
    """All-zero gradients: norm 0, coefficient clamped to 1, gradients stay 0 (no nan). Never
    'active': no max_norm is below a norm of 0."""
    side = compare_with_eager(supervised(zoo.mlp_input, lambda out: (out * 0).sum()), lambda: [zoo.mlp()], sgd,
                              max_norm=1.0, inner=inner, tol="bitwise")
    for grads, norm in side.steps[0].records:
        assert float(norm) == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert taken(side.clip) == from_backward(), side.clip.stats


def _poison(value):
    """A model whose first-layer weight gradient holds ``value`` at one element."""

    class Poisoned(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = zoo.mlp()

        def forward(self, x):
            w = self.net[0].weight
            # adds value * w[0, 0] to the output, so d/dw[0,0] gets `value` (times upstream 1)
            return self.net(x).sum() + w[0, 0] * value

    return Poisoned


class NanStep(Step):
    """The eager reference's step (after its clip), for gradients holding nan: ``Step.raw`` checks
    with ``torch.equal`` that the eager step left ``.grad`` alone, and nan != nan there; this
    checks it with ``equal_nan``, then records as ``Step.record`` does."""

    def raw(self, *args, **kwargs):
        before = [None if p.grad is None else p.grad.clone() for p in self.params()]
        out = self.opt.step(*args, **kwargs)
        grads = [None if p.grad is None else p.grad.clone() for p in self.params()]
        for k, (g, b) in enumerate(zip(grads, before)):
            assert (g is None) == (b is None), k
            if g is not None:  # SGD does not write .grad: unchanged, nan where it was
                torch.testing.assert_close(g, b, rtol=0, atol=0, equal_nan=True, msg=f"eager .grad {k} changed")
        self.records.append((grads, self.reference.last_norm))
        return out


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_gradient_matches_eager(value, max_norm):
    """Without error_if_nonfinite, eager scales by a nan/0 coefficient; so do we. The harness's
    compare_with_eager, with the eager steps as ``NanStep``."""
    loop = supervised(zoo.mlp_input, loss_fn=lambda out: out)
    torch.manual_seed(0)
    model = _poison(value)()
    ref = copy.deepcopy(model)
    eager = eager_side([ref], sgd([ref]), EagerClip(max_norm))
    eager.steps = [NanStep(s.opt, reference=s.reference) for s in eager.steps]
    ref_trace = train(loop, eager, range(ITERATIONS))
    side = compiled_side([model], sgd([model]), max_norm=max_norm)
    compare(train(loop, side, range(ITERATIONS)), ref_trace, max_norm, tol={"equal_nan": True})
    assert all(not math.isfinite(float(norm)) for _, norm in side.steps[0].records)
    assert taken(side.clip) == from_backward(), side.clip.stats


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_error_if_nonfinite(value, fuse, max_norm):
    """Like eager: the error is raised where eager's clip runs, right before the step, with
    .grad populated and unscaled, and the parameters untouched. (Not on the harness: its
    eager steps record only steps that ran.)"""
    torch.manual_seed(0)
    model = _poison(value)()
    ref = copy.deepcopy(model)
    clip = new_clip(max_norm=max_norm, error_if_nonfinite=True, fuse=fuse)
    compiled = torch.compile(model, backend=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(ITERATIONS):
        torch.manual_seed(1000 + step)
        x = torch.randn(6, 8)
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        compiled(x).backward()
        with pytest.raises(RuntimeError, match="non-finite"):
            opt.step()
        ref(x).backward()
        with pytest.raises(RuntimeError, match="non-finite"):
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, error_if_nonfinite=True)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
            torch.testing.assert_close(p, q)
    expected = from_backward() if fuse else {"step_eager": ITERATIONS, "norm_at_step": ITERATIONS}
    assert taken(clip) == expected, clip.stats


def test_max_norm_tensor_changes_without_recompile():
    """``max_norm`` a tensor, filled with another value before each iteration (the clip active,
    then inactive, then active again): the clip reads it at each step, with no recompile."""
    values = [0.05, 0.01, 1e6, 0.2]
    max_norm = torch.tensor(values[0])

    def loop(models_, opts, clip, steps, i):
        max_norm.fill_(values[i])  # shared by the eager reference and the clip
        supervised(zoo.mlp_input)(models_, opts, clip, steps, i)

    with torch._dynamo.config.patch(error_on_recompile=True):
        side = compare_with_eager(loop, lambda: [zoo.mlp()], sgd, max_norm=max_norm, iterations=len(values))
    # the harness checks active/inactive for float max_norm only: here, per iteration
    for value, (_, norm) in zip(values, side.steps[0].records):
        assert (float(norm) > value) == (value != 1e6), (float(norm), value)
    assert taken(side.clip) == from_backward(len(values)), side.clip.stats


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    batch=st.integers(1, 5),
    max_norm=st.sampled_from([1e-3, 0.1, 1.0, 1e3]),
    norm_type=st.sampled_from([1.0, 2.0, math.inf, 0.7, 3.0]),
    bias=st.booleans(),
    inner=st.sampled_from(["inductor", "aot_eager"]),
)
def test_random_mlps(widths, batch, max_norm, norm_type, bias, inner):
    torch._dynamo.reset()
    gc.collect()  # the clip of the last example: no clip may live while the eager copy trains
    dims = [5, *widths, 3]

    def make_model():
        layers = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
        return nn.Sequential(*layers[:-1])

    # max_norm is drawn, not ACTIVE/INACTIVE: the harness does not check which it was
    side = compare_with_eager(supervised(lambda i: (torch.randn(batch, 5),)), lambda: [make_model()], sgd,
                              max_norm=max_norm, norm_type=norm_type, inner=inner)
    assert taken(side.clip) == from_backward(), side.clip.stats
