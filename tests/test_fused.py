"""The clip folded into a fused optimizer's kernel: torch's ``fused=True`` optimizers divide each
gradient by ``opt.grad_scale`` and write it back, so the clip hands them ``1 / coefficient``
there instead of scaling the gradients in a pass of its own.

Against eager ``clip_grad_norm_`` + the same fused optimizer, at assert_close's float32
tolerances: the kernel divides by the rounded reciprocal where eager multiplies by the
coefficient (``grad / (1 / c)`` against ``grad * c``: an ulp or so per gradient, no more)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import models
from harness import ACTIVE, INACTIVE, compare_with_eager, group_loop, isolated, new_clip, stats  # noqa: F401
from test_policies import train

AOT = {"inner": "aot_eager"}

FUSED = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
}


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


class OpsOf(TorchDispatchMode):
    """The aten ops run while active that read any of ``watched`` (tensors, by identity)."""

    def __init__(self, watched):
        super().__init__()
        self.watched = {id(t) for t in watched}
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for x in (*args, *(kwargs or {}).values()) for a in (x if isinstance(x, (list, tuple)) else [x])]
        if any(id(a) in self.watched for a in flat):
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def batch():
    return torch.randn(6, 8), torch.randn(6, 4)


def make_loop(watch: list | None = None):
    def loop(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        x, y = batch()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        if clip is None or watch is None:
            step()
            return
        with OpsOf([p.grad for p in model.parameters()]) as ops:
            opt.step()
        step.record()
        if i > 0:  # the first: SGD copies the gradients into its new momentum buffers
            watch.append(ops.names)
        assert getattr(opt, "grad_scale", None) is None, "the clip left its coefficient in opt.grad_scale"
    return loop


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_step_folds_the_scale(max_norm, name):
    """Model compiled with the clip, eager fused step: eager's numbers, and during the step no
    scale pass (no mul over the gradients) and no norm pass (the backward computed the
    gradients' norms): the step reads the gradients once, in the kernel."""
    watch: list = []
    side = compare_with_eager(make_loop(watch), lambda: [models.mlp()], lambda ms: [FUSED[name](ms[0].parameters())],
                              max_norm=max_norm, iterations=4, **AOT)
    assert stats(side.clip)["norm_from_backward"] == 4
    if not getattr(side.opts[0], "_step_supports_amp_scaling", False):
        # torch 2.11's fused Adagrad does not declare that it reads grad_scale: not folded,
        # clipped by one _foreach_mul_ (eager's numbers all the same, compared above)
        assert "scale_folded" not in stats(side.clip), side.clip.stats
        return
    assert stats(side.clip)["scale_folded"] == 4
    assert len(watch) == 3
    for names in watch:  # the ops that read a gradient during the step: the optimizer's kernel
        assert [n.split(".")[0] for n in names] == [f"_fused_{name}_"], names


def test_fused_with_compiled_step_is_exact(max_norm):
    """``compile_step`` over a fused optimizer: the step graph clips (no fold), still eager's."""
    from harness import step_compiled

    compare_with_eager(make_loop(), lambda: [models.mlp()], lambda ms: [FUSED["adamw"](ms[0].parameters())],
                       step_compiled(compile_model=True), max_norm=max_norm, iterations=3, **AOT)


def test_fused_two_optimizers_no_fold(max_norm):
    """A group of two fused optimizers: the second consumes gradients the first's kernel would
    only clip for itself, so the clip scales them in a pass (no fold), as eager."""
    def opts(ms):
        ps = list(ms[0].parameters())
        return [torch.optim.AdamW([p for p in ps if p.ndim == 2], lr=1e-2, fused=True),
                torch.optim.SGD([p for p in ps if p.ndim != 2], lr=0.1, fused=True)]

    side = compare_with_eager(group_loop(batch), lambda: [models.mlp()], opts, max_norm=max_norm, iterations=3, **AOT)
    assert "scale_folded" not in stats(side.clip)


@pytest.mark.parametrize("first", [False, True], ids=["later", "first"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_fused_skip_nonfinite(kind, first):
    """``skip_nonfinite`` with a fused Adam stepped eagerly: the nonfinite flag goes to the
    kernel as ``found_inf``; parameters and state (the step count too) stay as eager's, which
    skips ``opt.step()``; a skipped first step leaves no state (dropped at the next step). The
    ``.grad`` of a skipped step keeps the unclipped gradients (nothing consumed them; eager's
    clip scaled them by 0 or nan), so it is not compared on those steps."""
    bad = {0: kind, 2: kind} if first else {1: kind, 3: kind}
    clip = train(mode="backward", max_norm=ACTIVE, skip_nonfinite=True, optimizer="adam_fused",
                 bad_steps=bad, steps=5, grads_on_skipped_steps=False, state_from_step=1 if first else 0)
    assert int(clip.skipped_steps) == 2
    assert clip.stats["scale_folded"] == 5


def test_fused_skip_nonfinite_does_not_sync(monkeypatch):
    """After the first step: no Tensor.item / __bool__ / __float__ during a fused step, finite
    or skipped."""
    from test_policies import bad_input

    torch.manual_seed(0)
    model = models.mlp()
    opt = FUSED["adam"](model.parameters())
    clip = new_clip(max_norm=ACTIVE, skip_nonfinite=True, inner="aot_eager")
    run = torch.compile(model, backend=clip)
    run(torch.randn(6, 8)).pow(2).mean().backward()
    opt.step()  # the first: may read whether it was skipped (to drop the state it created)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync during the step")

    for x in (torch.randn(6, 8), bad_input(torch.randn(6, 8), "nan"), torch.randn(6, 8)):
        opt.zero_grad(set_to_none=True)
        run(x).pow(2).mean().backward()
        for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, no_sync)
        opt.step()
        monkeypatch.undo()
    assert int(clip.skipped_steps) == 1
    assert clip.stats["scale_folded"] == 4
    assert not torch.isnan(next(model.parameters())).any()


def test_fused_grad_scaler():
    """GradScaler over a fused Adam, overflows at steps 1 and 3: ``scaler.step(opt)`` sets the
    kernel's ``grad_scale`` and ``found_inf`` and always calls the step; the clip unscales first
    (as eager's ``unscale_``) and folds its coefficient into ``grad_scale``; the kernel skips the
    overflowing steps on ``found_inf``. The scale, the skips and the numbers are eager's."""
    clip = train(mode="backward", max_norm=ACTIVE, amp=True, optimizer="adam_fused",
                 bad_steps={1: "inf", 3: "nan"}, steps=5)
    assert clip.stats["scale_folded"] == 5
