"""One compiled graph, several modules (``compileclip/instances.py``): Dynamo reuses the graph of
a module for every module of the same class, so the backend sees only the first one's
parameters. Two such models with an optimizer each (a GAN's, twin critics), the identical
blocks of regional compilation, and a new model of the same class in a sweep, against eager
``clip_grad_norm_`` over each optimizer's parameters right before its step (``harness.py``),
clip active and inactive. Before, the second model's steps went unclipped, silently."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import ACTIVE, INACTIVE, compare_with_eager, isolated, new_clip, regional, step_compiled, whole_model  # noqa: F401

AOT = {"inner": "aot_eager"}


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def twins():
    return [nn.Linear(8, 8), nn.Linear(8, 8)]


def one_sgd_each(models):
    return [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]


def summed_loss(models, opts, clip, steps, i):
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    (F.mse_loss(models[0](x), y) + F.mse_loss(models[1](x), y)).backward()
    for step in steps:
        step()


def one_after_the_other(models, opts, clip, steps, i):
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    for model, opt, step in zip(models, opts, steps):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        step()


@pytest.mark.parametrize("loop", [summed_loss, one_after_the_other])
def test_two_models_of_one_class_with_an_optimizer_each(max_norm, loop):
    side = compare_with_eager(loop, twins, one_sgd_each, max_norm=max_norm, **AOT)
    # one graph for both; each model's norms came from the backward runs made for it
    assert side.clip._runtime.graphs == 1 and side.clip.stats["norm_from_backward"] == 6, dict(side.clip.stats)


def test_two_models_of_one_class_compiled_steps(max_norm):
    compare_with_eager(summed_loss, twins, one_sgd_each, step_compiled(compile_model=True), max_norm=max_norm, **AOT)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(4)])

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def test_regional_compilation_of_identical_blocks(max_norm):
    def loop(models, opts, clip, steps, i):
        opts[0].zero_grad(set_to_none=True)
        models[0](torch.randn(4, 8)).square().mean().backward()
        steps[0]()

    side = compare_with_eager(loop, lambda: [Tower()], lambda ms: [torch.optim.AdamW(ms[0].parameters(), lr=1e-2)],
                              regional, max_norm=max_norm, **AOT)
    # every block's norms from its own backward run (before: the first block's only, so the
    # step normed every gradient again)
    assert side.clip.stats["norm_from_backward"] == 3 and "norm_at_step" not in side.clip.stats, dict(side.clip.stats)


def test_a_sweep_of_models_of_one_class_with_one_clip(max_norm):
    """Trial after trial, a new model and optimizer, compiled with the same clip (the graph of
    the first trial's model is reused), each against its eager run."""
    clip = new_clip(max_norm=max_norm, **AOT)
    for trial in range(3):
        torch.manual_seed(trial)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
        opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref, lr=0.1)
        run = torch.compile(model, backend=clip)
        for i in range(3):
            x = torch.randn(6, 8)
            opt.zero_grad(set_to_none=True)
            run(x).square().mean().backward()
            opt.step()
            ref_opt.zero_grad(set_to_none=True)
            out = F.linear(torch.tanh(F.linear(x, ref[0], ref[1])), ref[2], ref[3])
            out.square().mean().backward()
            norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
            ref_opt.step()
            assert (float(norm) > max_norm) == (max_norm == ACTIVE)
            torch.testing.assert_close(clip.total_norm, norm, msg=lambda m: f"trial {trial} step {i}: {m}")
            for p, q in zip(model.parameters(), ref):
                torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"trial {trial} step {i} .grad: {m}")
                torch.testing.assert_close(p, q, msg=lambda m: f"trial {trial} step {i} param: {m}")
        del model, opt, run
    assert clip._runtime.graphs == 1  # one graph, three models
