"""Gradients a backward of the clip produced that no optimizer consumes: eager code would clip
right before the step with them or without them, and the clip cannot tell which, so the first
step raises; ``clip.attach(opt)`` names the group (the optimizer's parameters) and the loop is
eager's ``clip_grad_norm_(opt's parameters)``. With gradient accumulation too: a backward
summed into an earlier one's gradient leaves no intact record, and the check used to look only
at intact records (fp32 master copies with two micro-batches stepped unclipped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import ACTIVE, INACTIVE, Step, compare_with_eager, isolated, new_clip  # noqa: F401

AOT = {"inner": "aot_eager"}


@pytest.mark.parametrize("micro", [1, 2])
def test_master_copies_raise_with_accumulation(micro):
    """The model compiled with the clip, the optimizer over fp32 master copies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    master = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = torch.optim.SGD(master, lr=0.1)
    clip = new_clip(max_norm=ACTIVE, **AOT)
    run = torch.compile(model, backend=clip)
    before = [m.detach().clone() for m in master]
    for _ in range(micro):
        F.mse_loss(run(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    for m, p in zip(master, model.parameters()):
        m.grad = p.grad.clone()
    with pytest.raises(RuntimeError, match="does not know"):
        opt.step()
    assert all(torch.equal(a, m) for a, m in zip(before, master))  # nothing updated


def trunk_and_head():
    return nn.Linear(8, 16), nn.Linear(16, 4)


def trunk_loop(micro):
    def loop(models, opts, clip, steps, i):
        trunk, head = models
        opts[0].zero_grad(set_to_none=True)
        trunk.zero_grad(set_to_none=True)
        for _ in range(micro):
            F.mse_loss(head(torch.tanh(trunk(torch.randn(6, 8)))), torch.randn(6, 4)).backward()
        steps[0]()
    return loop


def trunk_compiled(compile_step: bool, attach: bool):
    """The trunk compiled with the clip; the optimizer holds only the (eager) head."""
    def setup(models, opts, make):
        clip = make()
        if attach:
            clip.attach(opts[0])
        run = [torch.compile(models[0], backend=clip), models[1]]
        return run, [Step(o, clip, fn=clip.compile_step(o) if compile_step else None) for o in opts]
    return setup


@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("compile_step", [False, True], ids=["eager_step", "compile_step"])
def test_trunk_no_optimizer_consumes_raises(micro, compile_step):
    with pytest.raises(RuntimeError, match="does not know|no optimizer consumes"):
        compare_with_eager(trunk_loop(micro), trunk_and_head, lambda ms: [torch.optim.SGD(ms[1].parameters(), lr=0.1)],
                           trunk_compiled(compile_step, attach=False), max_norm=ACTIVE, iterations=1, **AOT)


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("compile_step", [False, True], ids=["eager_step", "compile_step"])
def test_trunk_attached_optimizer_clips_its_parameters(max_norm, compile_step):
    """``attach(opt)``: eager's ``clip_grad_norm_(head.parameters())`` (the harness's reference
    clips each optimizer's parameters)."""
    compare_with_eager(trunk_loop(2), trunk_and_head, lambda ms: [torch.optim.SGD(ms[1].parameters(), lr=0.1)],
                       trunk_compiled(compile_step, attach=True), max_norm=max_norm, iterations=3,
                       tol=None if compile_step else "bitwise", **AOT)


def data_write_loop(models, opts, clip, steps, i):
    """Old code that halves the gradients through ``.data``, which moves no version counter."""
    (model,) = models
    opts[0].zero_grad(set_to_none=True)
    F.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    for p in model.parameters():
        p.grad.data.mul_(0.5)
    steps[0]()


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_writes_through_data_with_fuse_false(max_norm):
    """The documented way out for writes the clip cannot see (docs/guide.md): ``fuse=False``
    norms at every step, eager's numbers. (With ``fuse=True`` the backward's norm of the
    gradients before the write is used: ``total_norm`` twice eager's here.)"""
    from harness import whole_model

    compare_with_eager(data_write_loop, lambda: [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))],
                       lambda ms: [torch.optim.SGD(ms[0].parameters(), lr=0.1)], whole_model(),
                       max_norm=max_norm, iterations=3, tol="bitwise", fuse=False, **AOT)


def input_grad_loop(models, opts, clip, steps, i):
    """FGSM-style: the input requires grad; its gradient is no optimizer's and no parameter's."""
    (model,) = models
    opts[0].zero_grad(set_to_none=True)
    x = torch.randn(6, 8, requires_grad=True)
    F.mse_loss(model(x), torch.randn(6, 4)).backward()
    assert x.grad is not None
    steps[0]()


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager_step", "compile_step"])
def test_an_input_that_requires_grad_is_not_unconsumed(compile_step):
    from harness import step_compiled, whole_model

    compare_with_eager(input_grad_loop, lambda: [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))],
                       lambda ms: [torch.optim.SGD(ms[0].parameters(), lr=0.1)],
                       step_compiled(compile_model=True) if compile_step else whole_model(),
                       max_norm=ACTIVE, iterations=3, tol=None if compile_step else "bitwise", **AOT)
