"""Golden tests: more real training loops against eager ``clip_grad_norm_`` (see
``test_real_loops.py`` and ``harness.py``): a closure step, GradScaler, resuming from a
checkpoint, and a Hugging Face Trainer-like loop."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import models
from harness import (ACTIVE, EagerClip, INACTIVE, compare, compare_with_eager, compiled_side, eager_side, isolated,  # noqa: F401
                   group_loop, per_opt, train, whole_model)

AOT = {"inner": "aot_eager"}


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def adamw(models_, **kwargs):
    return [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, **kwargs) for m in models_]


def batch():
    return torch.randn(6, 8), torch.randn(6, 4)


# -- 10. opt.step(closure) (Lightning's automatic optimization) -------------------------------


def closure_loop(models_, opts, clip, steps, i):
    (model,), (opt,), (step,) = models_, opts, steps
    x, y = batch()

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if clip is None:  # eager: clip after the closure's backward
            step.clip_grads()
        return loss

    step.raw(closure)  # opt.step(closure)


def test_closure_step(max_norm):
    compare_with_eager(closure_loop, lambda: [models.mlp()],
                       lambda ms: [torch.optim.SGD(ms[0].parameters(), lr=0.1, momentum=0.9)],
                       max_norm=max_norm, **AOT)


def test_two_optimizers_with_closures_that_run_no_backward(max_norm):
    """Lightning's manual optimization with two optimizers over one model: the backward before
    the steps, then ``opt.step(closure)`` for each with a closure that runs no backward. Eager
    clips the group once, before the first step; the second step's closure must not clip the
    clipped gradients again (it did: the second optimizer's gradients scaled twice, and
    ``total_norm`` the post-clip norm, found by a user-style script)."""
    def opts(ms):
        ps = list(ms[0].parameters())
        return [torch.optim.SGD(ps[:2], lr=0.1, momentum=0.9), torch.optim.AdamW(ps[2:], lr=1e-2)]

    compare_with_eager(group_loop(batch, (lambda: None,)), lambda: [models.mlp()], opts, max_norm=max_norm, **AOT)


# -- 11. GradScaler ----------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler(max_norm, fused):
    """``scaler.step(opt)`` with the model compiled with the clip. A fused AdamW gets the
    still-scaled gradients and ``opt.grad_scale`` from the scaler; the clip unscales them first,
    as ``unscale_`` would, so that it clips eager's gradients."""
    scalers = per_opt(lambda opt: torch.amp.GradScaler("cpu", init_scale=2.0**10))

    def loop(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        scaler = scalers(opt)
        x, y = batch()
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if clip is None:  # eager: unscale, clip the unscaled gradients, step
            scaler.unscale_(opt)
            step.clip_grads()
        scaler.step(opt)
        step.record()
        scaler.update()
        assert scaler.get_scale() == 2.0**10  # no overflow (the scale grows after 2000 steps)

    compare_with_eager(loop, lambda: [models.mlp()], lambda ms: adamw(ms, fused=fused), max_norm=max_norm, **AOT)


# -- 12. resume from a checkpoint --------------------------------------------------------------


def plain_loop(models_, opts, clip, steps, i):
    (model,), (opt,), (step,) = models_, opts, steps
    x, y = batch()
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    step()


def resumed(side):
    """A fresh model and optimizer loaded from a checkpoint of ``side``."""
    buf = io.BytesIO()
    torch.save({"model": side.models[0].state_dict(), "opt": side.opts[0].state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)
    torch.manual_seed(123)  # a different init, overwritten by the checkpoint
    model = models.mlp()
    model.load_state_dict(state["model"])
    (opt,) = adamw([model])
    opt.load_state_dict(state["opt"])
    return [model], [opt]


def test_resume_from_checkpoint(max_norm):
    torch.manual_seed(0)
    model = models.mlp()
    ref = copy.deepcopy(model)
    eager = eager_side([ref], adamw([ref]), EagerClip(max_norm))
    ref_trace = train(plain_loop, eager, range(2))
    ref_trace += train(plain_loop, eager_side(*resumed(eager), EagerClip(max_norm)), range(2, 4))
    compiled = compiled_side([model], adamw([model]), max_norm=max_norm, **AOT)
    trace = train(plain_loop, compiled, range(2))
    # a fresh model, optimizer, clip and torch.compile
    compiled = compiled_side(*resumed(compiled), whole_model(), max_norm=max_norm, **AOT)
    trace += train(plain_loop, compiled, range(2, 4))
    compare(trace, ref_trace, max_norm)


# -- 13. a Hugging Face Trainer-like loop ------------------------------------------------------


def test_hf_trainer_like(max_norm):
    # per optimizer step: 2 micro-batches, clip_grad_norm_, AdamW(fused=True).step(),
    # lr_scheduler.step(), zero_grad(set_to_none=True)
    schedulers = per_opt(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2) / (1 + 0.1 * s)))

    def loop(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        scheduler = schedulers(opt)
        for _ in range(2):
            idx = torch.randint(0, 32, (3, 8))
            logits = model(idx)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
            (loss / 2).backward()
        step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)

    # eps=1e-4: see test_regional_compilation (the key bias's gradient is rounding noise)
    compare_with_eager(loop, lambda: [models.TinyGPT()], lambda ms: adamw(ms, fused=True, eps=1e-4),
                       max_norm=max_norm, iterations=4)
