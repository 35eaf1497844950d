"""An optimizer whose parameters change during training, against eager: ``add_param_group`` (a
head added later, progressive unfreezing) and a parameter unfrozen with ``requires_grad_``. The
clip decides a step's group once and keeps it until the scope changes; a change of an
optimizer's parameter groups is such a change (``scope.layout``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import ACTIVE, INACTIVE, Step, compare_with_eager, isolated  # noqa: F401

AOT = {"inner": "aot_eager"}


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def body_and_head():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)), nn.Linear(8, 4)


def body_compiled(compile_step: bool):
    """The body compiled with the clip, the head eager (it joins the optimizer later)."""
    def setup(models, opts, make):
        clip = make()
        run = [torch.compile(models[0], backend=clip), models[1]]
        return run, [Step(o, clip, fn=clip.compile_step(o) if compile_step else None) for o in opts]
    return setup


def forward(models, opts, steps):
    body, head = models
    opts[0].zero_grad(set_to_none=True)
    F.mse_loss(head(body(torch.randn(6, 8))), torch.randn(6, 4)).backward()
    steps[0]()


def add_head_loop(models, opts, clip, steps, i):
    if i == 2:  # both sides: the head's parameters join the optimizer
        opts[0].add_param_group({"params": list(models[1].parameters()), "lr": 0.05})
    forward(models, opts, steps)


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager_step", "compile_step"])
def test_add_param_group_after_the_first_steps(max_norm, compile_step):
    """Before the fix the group stayed the body's: the head's gradients were left out of the
    norm from the third step on (a total norm of 2.48 against eager's 5.00)."""
    compare_with_eager(add_head_loop, body_and_head, lambda ms: [torch.optim.SGD(ms[0].parameters(), lr=0.1)],
                       body_compiled(compile_step), max_norm=max_norm, iterations=5,
                       tol=None if compile_step else "bitwise", **AOT)


def unfreeze_loop(models, opts, clip, steps, i):
    head = models[1]
    if i == 0:
        head.weight.requires_grad_(False)
    if i == 2:  # held by the optimizer from the start, trained from the third step on
        head.weight.requires_grad_(True)
    forward(models, opts, steps)


def test_unfreezing_a_parameter_the_optimizer_holds(max_norm):
    compare_with_eager(unfreeze_loop, body_and_head,
                       lambda ms: [torch.optim.SGD([*ms[0].parameters(), *ms[1].parameters()], lr=0.1)],
                       body_compiled(False), max_norm=max_norm, iterations=5, tol="bitwise", **AOT)
