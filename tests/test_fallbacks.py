"""Every case where a clip inside one backward graph would be wrong: eager's gradients
anyway (through the end-of-backward path, with a one-time warning), or a clear error."""

import copy
import warnings

import pytest
import torch

import models as zoo
from compileclip import clip_backend
from helpers import ACTIVE, INACTIVE, compare_with_eager, eager_clip, zero_grads


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_called_twice_before_backward(max_norm):
    with pytest.warns(UserWarning, match="2 compiled forwards ran"):
        _twice(max_norm)


def _twice(max_norm):
    """Two calls of the compiled model feed one loss."""
    torch.manual_seed(0)
    model = zoo.mlp()
    ref = copy.deepcopy(model)
    clip = clip_backend(max_norm=max_norm)
    compiled = torch.compile(model, backend=clip)
    for step in range(2):
        x1, x2 = torch.randn(6, 8), torch.randn(6, 8)
        zero_grads(model, ref)
        (compiled(x1).pow(2).mean() + compiled(x2).sum()).backward()
        (ref(x1).pow(2).mean() + ref(x2).sum()).backward()
        _assert_same(model, ref, clip, max_norm)
    assert clip.stats["deferred"] == 2


def _assert_same(model, ref, clip, max_norm, norm_type=2.0):
    ref_norm = eager_clip(ref, max_norm, norm_type, None)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"grad of {name}: {m}")
    torch.testing.assert_close(clip.total_norm, ref_norm)


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_parameter_used_outside_compiled_region(max_norm):
    """An eager L2 term on the parameters: the hooks see a second contribution in the
    first (probe) backward, and every backward after takes the exact path."""
    torch.manual_seed(0)
    model = zoo.mlp()
    ref = copy.deepcopy(model)
    clip = clip_backend(max_norm=max_norm)
    compiled = torch.compile(model, backend=clip)

    def loss(m, f, x):
        return f(x).pow(2).mean() + 0.1 * sum(p.pow(2).sum() for p in m.parameters())

    with pytest.warns(UserWarning, match="also received gradients from outside"):
        for step in range(3):
            x = torch.randn(6, 8)
            zero_grads(model, ref)
            loss(model, compiled, x).backward()
            loss(ref, ref, x).backward()
            _assert_same(model, ref, clip, max_norm)
    assert clip.stats == {"fused": 0, "probe": 1, "deferred": 2, "off": 0, "step": 0, "step_norm_from_backward": 0}


def test_outside_use_appearing_after_fusion_raises():
    """If the structure changes after the fused path was chosen, the gradients of that one
    backward cannot be exact: a clear error, then the exact path."""
    torch.manual_seed(0)
    model = zoo.mlp()
    clip = clip_backend(max_norm=ACTIVE)
    compiled = torch.compile(model, backend=clip)
    for _ in range(2):
        zero_grads(model)
        compiled(torch.randn(6, 8)).pow(2).mean().backward()
    assert clip.stats["fused"] == 1
    zero_grads(model)
    with pytest.raises(RuntimeError, match="gradients of this backward are wrong"):
        (compiled(torch.randn(6, 8)).pow(2).mean() + model[0].weight.sum()).backward()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 8)
    zero_grads(model, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (compiled(x).pow(2).mean() + model[0].weight.sum()).backward()
    (ref(x).pow(2).mean() + ref[0].weight.sum()).backward()
    _assert_same(model, ref, clip, ACTIVE)


def test_graph_break_warns_once_and_matches():
    with pytest.warns(UserWarning, match="graph break") as record:
        compare_with_eager(zoo.GraphBreak, zoo.mlp_input, steps=3, expect_stats={"deferred": 3})
    assert sum("compileclip" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_accumulate_context(max_norm):
    """Micro-batches inside accumulate() add up unclipped; the last backward clips the sum."""
    torch.manual_seed(0)
    model = zoo.mlp()
    ref = copy.deepcopy(model)
    clip = clip_backend(max_norm=max_norm)
    compiled = torch.compile(model, backend=clip)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented path does not warn
        for step in range(2):
            xs = [torch.randn(6, 8) for _ in range(3)]
            zero_grads(model, ref)
            with clip.accumulate():
                for x in xs[:-1]:
                    compiled(x).pow(2).mean().backward()
            compiled(xs[-1]).pow(2).mean().backward()
            for x in xs:
                ref(x).pow(2).mean().backward()
            _assert_same(model, ref, clip, max_norm)
    assert clip.stats == {"fused": 0, "probe": 0, "deferred": 2, "off": 4, "step": 0, "step_norm_from_backward": 0}


def test_accumulate_inside_is_unclipped():
    torch.manual_seed(0)
    model = zoo.mlp()
    ref = copy.deepcopy(model)
    clip = clip_backend(max_norm=ACTIVE)
    compiled = torch.compile(model, backend=clip)
    x = torch.randn(6, 8)
    with clip.accumulate():
        compiled(x).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_grad_already_set_without_accumulate(max_norm):
    """.grad holding values before backward (accumulation without accumulate()): the
    backward clips the accumulated .grad, as clip_grad_norm_ after it would."""
    torch.manual_seed(0)
    model = zoo.mlp()
    ref = copy.deepcopy(model)
    clip = clip_backend(max_norm=max_norm)
    compiled = torch.compile(model, backend=clip)
    for p, q in zip(model.parameters(), ref.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    x = torch.randn(6, 8)
    with pytest.warns(UserWarning, match="already held values"):
        compiled(x).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    _assert_same(model, ref, clip, max_norm)
    assert clip.stats["deferred"] == 1


def test_compiled_autograd_raises():
    torch.manual_seed(0)
    model = zoo.mlp()
    clip = clip_backend(max_norm=ACTIVE)
    compiled = torch.compile(model, backend=clip)
    compiled(torch.randn(6, 8)).pow(2).mean().backward()  # compile outside compiled autograd
    with pytest.raises(RuntimeError, match="does not support compiled autograd"):
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
            compiled(torch.randn(6, 8)).pow(2).mean().backward()


def test_fuse_false_always_takes_exact_path():
    compare_with_eager(
        zoo.mlp, zoo.mlp_input, steps=2, backend_kwargs={"fuse": False},
        expect_stats={"deferred": 2},
    )


def test_retained_graph_backward_again():
    """A graph kept with retain_graph=True runs its backward again with a new forward's:
    two backward graphs after one forward. Fused, that cannot be exact: a clear error."""
    torch.manual_seed(0)
    model = zoo.mlp()
    clip = clip_backend(max_norm=ACTIVE)
    compiled = torch.compile(model, backend=clip)
    zero_grads(model)
    kept = compiled(torch.randn(6, 8)).pow(2).mean()
    kept.backward(retain_graph=True)  # the probe
    zero_grads(model)
    with pytest.raises(RuntimeError, match="several compiled backward graphs ran in one backward"):
        (kept + compiled(torch.randn(6, 8)).pow(2).mean()).backward()
