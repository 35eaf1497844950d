"""Golden tests: real training loops with the clip, against eager ``clip_grad_norm_``.

The contract: the clip happens at ``opt.step()``, over the parameters of that optimizer that
have a ``.grad``, exactly as eager ``clip_grad_norm_(those params, max_norm, norm_type);
opt.step()``. Each test writes one training loop (``run(models, opts, clip, steps, i)``, see
``harness.py``) and trains a compiled copy and an eager copy of the same models with it,
comparing the gradients each step left, ``clip.total_norm`` and the parameters after every
step; each with the clip active (``max_norm`` far below the norm) and inactive (far above).
More loops in ``test_real_loops_2.py``.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from harness import (ACTIVE, EagerClip, INACTIVE, compare_with_eager, compiled_side, eager_side, in_fresh_process,  # noqa: F401
                   isolated, per_model_clips, per_model_clips_steps, regional, step_compiled, train, whole_model)

AOT = {"inner": "aot_eager"}  # the same graphs without Inductor: fast compiles


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def sgd(models_):
    return [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models_]


def adamw(models_, **kwargs):
    return [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, **kwargs) for m in models_]


def supervised(make_input=lambda: torch.randn(6, 8), out_features=4, micro_batches=1):
    """The plain loop: zero_grad, ``micro_batches`` backwards of an MSE loss, step."""
    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        opt.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            x = make_input()
            y = torch.randn(x.shape[0], *([x.shape[1]] if x.dim() == 3 else []), out_features)
            (F.mse_loss(model(x), y) / micro_batches).backward()
        step()
    return run


def lm_loss(logits, idx):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


# -- 1. regional compilation ---------------------------------------------------------------------


def gpt_loop(models_, opts, clip, steps, i):
    (model,), (opt,), (step,) = models_, opts, steps
    idx = torch.randint(0, 32, (3, 8))
    opt.zero_grad(set_to_none=True)
    lm_loss(model(idx), idx).backward()
    step()


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_regional_compilation(max_norm, inner):
    # blocks compiled with the clip; the tied embedding/head, pos and final norm run eagerly.
    # eps=1e-4: the key bias's gradient is zero in exact arithmetic (softmax is shift-invariant),
    # and with the default eps AdamW turns its rounding noise into lr-sized steps: plain
    # torch.compile (Inductor, no clip, eager clip_grad_norm_ on both sides) then differs from
    # eager by 4e-3 in blocks.0.qkv.bias after the first step (clip inactive); with 1e-4 it
    # matches at the default tolerances
    compare_with_eager(gpt_loop, lambda: [models.TinyGPT()], lambda ms: adamw(ms, eps=1e-4), regional,
                       max_norm=max_norm, inner=inner)


# -- 2. a model of which Dynamo compiles no graph -------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # a warning that nothing compiled is fine
def test_lstm_without_any_graph(max_norm):
    compare_with_eager(supervised(lambda: torch.randn(2, 7, 8)), lambda: [models.RNNModel(nn.LSTM)], sgd,
                       max_norm=max_norm, **AOT)


# -- 3. data-dependent branches --------------------------------------------------------------------


class MoE(nn.Module):
    """Top-1 routing: an expert that gets no token this batch gets no ``.grad``."""

    def __init__(self, dim=8, experts=4):
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, dim)) for _ in range(experts))
        self.out = nn.Linear(dim, 4)

    def forward(self, x):
        logits = self.router(x)
        route, gate = logits.argmax(-1), logits.softmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = route == e
            if mask.any():
                out[mask] = expert(x[mask]) * gate[mask][:, e:e + 1]
        return self.out(out + x)


def test_moe_data_dependent_branch(max_norm):
    compiled = compare_with_eager(supervised(lambda: torch.randn(5, 8)), lambda: [MoE()], adamw,
                                  max_norm=max_norm, iterations=4, **AOT)
    # the loop really had steps where an expert got no token (no .grad: left out of the norm)
    assert any(g is None for grads, _ in compiled.steps[0].records for g in grads)


# -- 4. a sweep in one process ---------------------------------------------------------------------


def test_sweep_of_ten_trials(max_norm):
    # fresh model, clip, torch.compile and optimizer per trial; from the 9th trial on Dynamo is
    # at its recompile limit (8) for the model's forward and runs it eagerly
    for trial in range(10):
        lr = 0.01 * (trial + 1)
        try:
            compare_with_eager(supervised(), lambda: [models.mlp()],
                               lambda ms: [torch.optim.SGD(ms[0].parameters(), lr=lr, momentum=0.9)],
                               max_norm=max_norm, iterations=2, seed=trial, **AOT)
        except (AssertionError, RuntimeError) as e:  # say which trial
            raise AssertionError(f"trial {trial} of the sweep: {type(e).__name__}: {e}") from e


# -- 5. GANs ---------------------------------------------------------------------------------------


def gan_models():
    D = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    return [D, G]


def gan_opts(models_):
    return [torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.5, 0.999)) for m in models_]


def gan_loop(models_, opts, clip, steps, i):
    # eager: clip_grad_norm_(D.parameters()) before opt_D.step(), (G.parameters()) before opt_G's
    (D, G), (opt_d, opt_g), (step_d, step_g) = models_, opts, steps
    real, z = torch.randn(6, 8) * 0.5 + 1.0, torch.randn(6, 4)
    ones, zeros = torch.ones(6, 1), torch.zeros(6, 1)
    fake = G(z)
    opt_d.zero_grad(set_to_none=True)
    d_loss = F.binary_cross_entropy_with_logits(D(real), ones) + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros)
    d_loss.backward()
    step_d()
    opt_g.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(D(fake), ones).backward()  # also fills D's .grad: not opt_g's
    step_g()


@pytest.mark.parametrize("clips", ["one_clip", "clip_per_model", "clip_per_model_compiled_steps"])
def test_gan(max_norm, clips):
    setup = {"one_clip": whole_model(), "clip_per_model": per_model_clips,
             "clip_per_model_compiled_steps": per_model_clips_steps}[clips]
    compare_with_eager(gan_loop, gan_models, gan_opts, setup, max_norm=max_norm, **AOT)


# -- 6. two or more backwards into one .grad, no context manager ----------------------------------


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 3)

    def forward(self, x):
        h = self.trunk(x)
        return self.a(h), self.b(h)


def multitask_loop(models_, opts, clip, steps, i):
    (model,), (opt,), (step,) = models_, opts, steps
    x, y, label = torch.randn(6, 8), torch.randn(6, 4), torch.randint(0, 3, (6,))
    opt.zero_grad(set_to_none=True)
    out_a, out_b = model(x)
    F.mse_loss(out_a, y).backward(retain_graph=True)
    F.cross_entropy(out_b, label).backward()
    step()


def test_multitask_retain_graph(max_norm):
    compare_with_eager(multitask_loop, lambda: [TwoHeads()], adamw, max_norm=max_norm, **AOT)


def test_naive_accumulation(max_norm):
    compare_with_eager(supervised(micro_batches=3), lambda: [models.mlp()], sgd, max_norm=max_norm, **AOT)


def test_accumulation_with_compiled_step(max_norm):
    # one clip for model and step; three micro-batches from the very first step on
    compare_with_eager(supervised(micro_batches=3), lambda: [models.mlp()], sgd, step_compiled(compile_model=True),
                       max_norm=max_norm, **AOT)


# -- 7. fused AdamW in a compiled step -------------------------------------------------------------


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager_model", "compiled_model"])
def test_fused_adamw_compiled_step(max_norm, compile_model):
    inner = {} if compile_model else AOT  # the default Inductor once
    compare_with_eager(supervised(), lambda: [models.mlp()], lambda ms: adamw(ms, fused=True),
                       step_compiled(compile_model), max_norm=max_norm, **inner)


# -- 8. torch.compile's mode and options -----------------------------------------------------------


@pytest.mark.parametrize("compile_kwargs", [{"mode": "max-autotune-no-cudagraphs"}, {"options": {"max_autotune": False}}],
                         ids=["max_autotune_mode", "options"])
def test_compile_mode_and_options(max_norm, compile_kwargs):
    compare_with_eager(supervised(), lambda: [models.mlp()], sgd, whole_model(**compile_kwargs), max_norm=max_norm)


# -- 9. sparse gradients ---------------------------------------------------------------------------


class SparseBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8, sparse=True)
        self.out = nn.Linear(8, 4)

    def forward(self, idx):
        return self.out(self.emb(idx).mean(1))


def sparse_scenario(max_norm):
    torch.manual_seed(0)
    model = SparseBag()
    ref = copy.deepcopy(model)
    loop = supervised(lambda: torch.randint(0, 16, (6, 3)))
    # eager clip_grad_norm_ raises on a sparse .grad in this torch, before the step:
    # linalg_vector_norm has no SparseCPU kernel (NotImplementedError, a RuntimeError)
    eager = eager_side([ref], sgd([ref]), EagerClip(max_norm))
    torch.manual_seed(1000)
    with pytest.raises(NotImplementedError, match="Sparse"):
        loop(eager.run_models, eager.opts, None, eager.steps, 0)
    compiled = compiled_side([model], sgd([model]), max_norm=max_norm, **AOT)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1000)
    with pytest.raises((RuntimeError, ValueError), match="(?i)sparse"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop(compiled.run_models, compiled.opts, compiled.clip, compiled.steps, 0)
    # as eager: no update with unclipped gradients
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b)


# in a fresh process: Dynamo keeps a backend that raised alive (torch._dynamo.reset() and
# gc.collect() do not free it), and a live clip hears every optimizer step of the process


def test_sparse_embedding_raises(max_norm):
    in_fresh_process(sparse_scenario, max_norm)


def plain_training_after_sparse_error():
    sparse_scenario(ACTIVE)
    torch._dynamo.reset()
    gc.collect()
    # later in the process, a model trained eagerly, no clip object: the failed one must not
    # clip its steps (Step.record checks) nor refuse them
    torch.manual_seed(0)
    model = models.mlp()
    train(supervised(), eager_side([model], sgd([model]), EagerClip(ACTIVE)), range(2))


def test_failed_clip_leaves_later_training_alone():
    in_fresh_process(plain_training_after_sparse_error)
