"""Norm types, dtypes, dynamic shapes, non-finite gradients, a changing max_norm, and random
small MLPs drawn by hypothesis, each against eager clip_grad_norm_."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

import models as zoo
from compileclip import clip_backend
from helpers import ACTIVE, INACTIVE, compare_with_eager, from_backward, zero_grads

FUSED = from_backward(2)


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.5, 3.5, "inf"])
def test_norm_types(norm_type, max_norm):
    p = math.inf if norm_type == "inf" else norm_type
    compare_with_eager(zoo.mlp, zoo.mlp_input, norm_type=p, max_norm=max_norm, expect_stats=FUSED)


# bf16/fp16: the compiled and the eager model differ in rounding of intermediates (Inductor
# computes pointwise ops in fp32 and rounds once; eager rounds after every op). The reference
# is therefore the same model under plain torch.compile, clipped eagerly with a float64 norm.
@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters(dtype, max_norm):
    """Against plain torch.compile + eager clip_grad_norm_ (float64 norm), at assert_close's
    default tolerances for the dtype. The compiled reference cancels Inductor's own rounding:
    plain torch.compile without any clip differs from eager by up to 4.9e-4 on these bf16
    gradients (torch 2.11 and 2.13), while the clip's result differs from the compiled
    reference by 0 with the clip inactive and by at most 7.6e-6 with it active (measured).
    The backward's norm (one compileclip::total_norm call) reads the bf16/fp16 gradients as
    returned, after their rounding, so the step uses it; an Inductor reduction fused into the
    producer would read them before rounding (2.9e-5 relative on this model)."""
    compare_with_eager(
        zoo.mlp, lambda s: (torch.randn(6, 8, dtype=dtype),),
        dtype=dtype, reference_dtype=torch.float64, max_norm=max_norm,
        expect_stats={"step_eager": 2, "norm_from_backward": 2, "backward_graph_runs": 2},
        compiled_reference=True,
    )


def test_norm_accumulates_in_float32():
    """fp16 gradients of 30000 each (representable) whose norm, 120000, is not: eager's
    fp16 norm overflows to inf, ours is the float32 value."""
    model = nn.Linear(4, 4, bias=False).to(torch.float16)
    clip = clip_backend(max_norm=1.0)
    compiled = torch.compile(model, backend=clip)
    x = torch.full((1, 4), 300.0, dtype=torch.float16)
    (compiled(x).float() * 100).sum().backward()  # d/dW = 100 * x = 30000 everywhere
    torch.optim.SGD(model.parameters(), lr=0.0).step()  # the clip runs at the step
    assert clip.total_norm.dtype == torch.float32
    torch.testing.assert_close(clip.total_norm, torch.tensor(120000.0))
    assert math.isinf(float(torch.linalg.vector_norm(torch.full((4, 4), 3e4, dtype=torch.float16))))
    torch.testing.assert_close(model.weight.grad, torch.full((4, 4), 30000 / 120000.0, dtype=torch.float16))


def test_dynamic_shapes_no_recompile():
    sizes = iter([4, 7, 9, 5])

    def make_input(step):
        return (torch.randn(next(sizes), 8),)

    with torch._dynamo.config.patch(error_on_recompile=True):
        compare_with_eager(
            zoo.mlp, make_input, steps=4, compile_kwargs={"dynamic": True},
            expect_stats=from_backward(4),
        )


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_zero_gradients(inner):
    """All-zero gradients: norm 0, coefficient clamped to 1, gradients stay 0 (no nan)."""
    model = zoo.mlp()
    clip = clip_backend(max_norm=1.0, inner=inner)
    compiled = torch.compile(model, backend=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        zero_grads(model)
        (compiled(torch.randn(6, 8)) * 0).sum().backward()
        opt.step()
        assert float(clip.total_norm) == 0.0
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


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


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_gradient_matches_eager(value):
    """Without error_if_nonfinite, eager scales by a nan/0 coefficient; so do we."""
    compare_with_eager(
        _poison(value), zoo.mlp_input, loss_fn=lambda out: out,
        steps=2, expect_stats=FUSED, check_clip_state=False, equal_nan=True,
    )


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_error_if_nonfinite(value, fuse):
    """Like eager: the error is raised where eager's clip runs, right before the step, with
    .grad populated and unscaled, and the parameters untouched."""
    torch.manual_seed(0)
    Model = _poison(value)
    model = Model()
    ref = copy.deepcopy(model)
    clip = clip_backend(max_norm=ACTIVE, error_if_nonfinite=True, fuse=fuse)
    compiled = torch.compile(model, backend=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        x = torch.randn(6, 8)
        zero_grads(model, ref)
        compiled(x).backward()
        with pytest.raises(RuntimeError, match="non-finite"):
            opt.step()
        ref(x).backward()
        with pytest.raises(RuntimeError, match="non-finite"):
            torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE, error_if_nonfinite=True)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
            torch.testing.assert_close(p, q)
    taken = {k: v for k, v in clip.stats.items() if v}
    assert taken == (from_backward(2) if fuse else {"step_eager": 2, "norm_at_step": 2}), taken


def test_max_norm_tensor_changes_without_recompile():
    torch.manual_seed(0)
    max_norm = torch.tensor(0.05)
    model = zoo.mlp()
    ref = copy.deepcopy(model)
    clip = clip_backend(max_norm=max_norm)
    compiled = torch.compile(model, backend=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the clip runs at its step
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step, value in enumerate([0.05, 0.01, 1e6, 0.2]):
            max_norm.fill_(value)
            x = torch.randn(6, 8)
            zero_grads(model, ref)
            compiled(x).pow(2).mean().backward()
            opt.step()
            ref(x).pow(2).mean().backward()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), value)
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, q.grad)
            torch.testing.assert_close(clip.total_norm, ref_norm)
    assert clip.stats["norm_from_backward"] == 4


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
    dims = [5, *widths, 3]

    def make_model():
        layers = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
        return nn.Sequential(*layers[:-1])

    compare_with_eager(
        make_model, lambda s: (torch.randn(batch, 5),), max_norm=max_norm, norm_type=norm_type,
        backend_kwargs={"inner": inner}, check_clip_state=False,
        expect_stats=FUSED,
    )
