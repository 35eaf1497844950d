"""Golden tests of the scope rule: the clip takes the group of the stepping optimizer (the units
whose leaves it holds, and every optimizer holding leaves of those), clipped once per backward,
as eager ``clip_grad_norm_(group)`` right before the group's first step. Each setup against
eager, over 4 iterations, with the clip active and inactive (``harness.py``). Two clips in one
loop and ``ZeroRedundancyOptimizer`` are in ``test_scope_2.py`` and ``dist_worker.py``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from harness import (ACTIVE, INACTIVE, Leaves, Step, compare_with_eager, isolated, mlp, new_clip,  # noqa: F401
                     step_compiled, whole_model)

AOT = {"inner": "aot_eager"}


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


# -- one model, two optimizers (modded-nanogpt: Muon for the hidden matrices, AdamW for the rest)


def hidden_and_rest(model):
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n]
    ids = {id(p) for p in hidden}
    return hidden, [p for p in model.parameters() if id(p) not in ids]


def muon_adamw(muon=None):
    def make(ms):
        hidden, rest = hidden_and_rest(ms[0])
        first = muon(hidden) if muon is not None else torch.optim.SGD(hidden, lr=0.05, momentum=0.9, nesterov=True)
        return [first, torch.optim.AdamW(rest, lr=1e-2, betas=(0.9, 0.95), eps=1e-4)]
    return make


def two_optimizers(models_, opts, clip, steps, i):
    """Eager: ``clip_grad_norm_(model.parameters())`` once, then both steps."""
    (model,), (s1, s2) = models_, steps
    for o in opts:
        o.zero_grad(set_to_none=True)
    idx = torch.randint(0, 32, (3, 8))
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1)).backward()
    if clip is None:
        s1.clip_grads(model.parameters())  # the eager reference: one clip for the model
    s1.raw()
    s2.raw()


@pytest.mark.parametrize("setup", ["model", "model_and_step"])
def test_one_model_two_optimizers(max_norm, setup):
    chosen = whole_model() if setup == "model" else step_compiled(compile_model=True)
    side = compare_with_eager(two_optimizers, lambda: [models.TinyGPT()], muon_adamw(), chosen,
                              max_norm=max_norm, iterations=4, **AOT)
    # one clip per backward, taken at the first step; the second found its gradients clipped
    assert side.clip.stats["step_already_clipped"] == 4, side.clip.stats
    # the norm is the model's: the steps' own norms (each over its own parameters) are smaller
    assert len({float(n) for _, n in side.steps[0].records}) == 4


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_from_torch(max_norm):
    muon = lambda ps: torch.optim.Muon(ps, lr=0.02, adjust_lr_fn="match_rms_adamw")  # noqa: E731
    compare_with_eager(two_optimizers, lambda: [models.TinyGPT()], muon_adamw(muon), max_norm=max_norm,
                       iterations=4, **AOT)


# -- plain leaf tensors, a functional forward ------------------------------------------------------


def functional_weights():
    g = torch.Generator().manual_seed(0)
    return [Leaves({name: (torch.randn(*shape, generator=g) * 0.3).requires_grad_()
                    for name, shape in (("w1", (8, 16)), ("b1", (16,)), ("w2", (16, 4)))})]


def forward(w, x):
    return torch.tanh(x @ w["w1"] + w["b1"]) @ w["w2"]


def functional_setup(compile_step: bool):
    def setup(leaves, opts, make):
        clip = make()
        fn = torch.compile(forward, backend=clip)
        steps = [Step(o, clip, fn=clip.compile_step(o) if compile_step else None) for o in opts]
        return [lambda x, w=leaves[0].tensors: fn(w, x)], steps
    return setup


def functional_loop(models_, opts, clip, steps, i):
    (f,), (opt,), (step,) = models_, opts, steps
    if not callable(f):  # the eager copy: the Leaves themselves
        f = (lambda x, w=f.tensors: forward(w, x))
    opt.zero_grad(set_to_none=True)
    F.mse_loss(f(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    step()


@pytest.mark.parametrize("compile_step", [False, True], ids=["model", "model_and_step"])
def test_plain_leaf_tensors(max_norm, compile_step):
    side = compare_with_eager(functional_loop, functional_weights,
                              lambda ls: [torch.optim.SGD(ls[0].parameters(), lr=0.1, momentum=0.9)],
                              functional_setup(compile_step), max_norm=max_norm, iterations=4, **AOT)
    assert side.clip.stats["backward_graph_runs"] == 4, side.clip.stats


# -- fp32 master weights -----------------------------------------------------------------------


def master_loop(models_, opts, clip, steps, i):
    """A bf16 model; Adam over fp32 copies, ``master.grad = p.grad.float()``; the copies go back."""
    (model,), (opt,), (step,) = models_, opts, steps
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    F.mse_loss(model(torch.randn(6, 8).bfloat16()).float(), torch.randn(6, 4)).backward()
    for p, m in zip(model.parameters(), opt.param_groups[0]["params"]):
        m.grad = p.grad.float()
    step()
    with torch.no_grad():
        for p, m in zip(model.parameters(), opt.param_groups[0]["params"]):
            p.copy_(m)


def masters(ms):
    return [torch.optim.Adam([p.detach().float().requires_grad_() for p in ms[0].parameters()], lr=1e-2)]


def test_master_weights_raise_until_told():
    torch.manual_seed(0)
    model = mlp().bfloat16()
    (opt,) = masters([model])
    clip = new_clip(max_norm=ACTIVE, **AOT)
    compiled = torch.compile(model, backend=clip)
    before = [m.detach().clone() for m in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match=r"(?s)Adam.step\(\) updates parameters that this clip does not know.*clip\.attach\(optimizer\)"):
        master_loop([compiled], [opt], clip, [Step(opt, clip)], 0)
    for m, b in zip(opt.param_groups[0]["params"], before):  # nothing was updated
        assert torch.equal(m, b)


def attached(models_, opts, make):
    clip = make()
    for o in opts:
        clip.attach(o)  # clip_grad_norm_(the masters) before each step
    return [torch.compile(m, backend=clip) for m in models_], [Step(o, clip) for o in opts]


def test_master_weights_once_told(max_norm):
    compare_with_eager(master_loop, lambda: [mlp().bfloat16()], masters, attached, max_norm=max_norm,
                       iterations=4, **AOT)


# -- a user's Optimizer subclass through compile_step --------------------------------------------


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023), as users write it."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def plain_loop(models_, opts, clip, steps, i):
    (model,), (opt,), (step,) = models_, opts, steps
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    step()


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager_model", "compiled_model"])
def test_custom_optimizer_compile_step(max_norm, compile_model):
    side = compare_with_eager(plain_loop, lambda: [mlp()], lambda ms: [Lion(ms[0].parameters(), lr=1e-3, weight_decay=0.1)],
                              step_compiled(compile_model), max_norm=max_norm, iterations=4, **AOT)
    assert side.clip.stats["step_in_graph"] == 3, side.clip.stats  # the first step runs before its graph


# -- bitwise on the eager-step path ------------------------------------------------------------


def gpt_loop(models_, opts, clip, steps, i):
    (model,), (opt,), (step,) = models_, opts, steps
    opt.zero_grad(set_to_none=True)
    idx = torch.randint(0, 32, (3, 8))
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1)).backward()
    step()


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "linf"])
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_bitwise_with_plain_compile_and_eager_clip(model, norm_type):
    """The model compiled with the clip and a plain ``opt.step()`` against plain
    ``torch.compile(model)`` + ``clip_grad_norm_(model.parameters(), max_norm)``: the same
    Inductor backward, eager's ``_foreach_norm``, norm of norms, coefficient and
    ``_foreach_mul_``, so every bit. 8 steps; max_norm not a power of two."""
    make, loop = (lambda: [mlp()], plain_loop) if model == "mlp" else (lambda: [models.TinyGPT()], gpt_loop)
    max_norm = 0.37 if norm_type == 2.0 else 0.0123
    adamw = lambda ms: [torch.optim.AdamW(ms[0].parameters(), lr=1e-2, weight_decay=0.1)]  # noqa: E731
    compare_with_eager(loop, make, adamw, max_norm=max_norm, norm_type=norm_type, iterations=8, tol="bitwise",
                       reference_compile={})
