"""Clipping fused into the compiled optimizer step: ``torch.compile(opt.step, backend=clip)``.

Each test trains a copy of the model with the compiled, clipped step and a copy eagerly
(``clip_grad_norm_(params, max_norm); opt.step()``) on the same fresh random inputs, over
several steps, with the clip active and inactive (``harness.py``: parameters, ``.grad`` after
the step, ``clip.total_norm`` and optimizer state after every step): every optimizer with and
without ``foreach``, ``step_writes_grad=False``, ``inner``, ``fuse=False``, norm types, parameter
groups with frozen and unused parameters, tensor hyperparameters that change without a
recompile, gradient accumulation. The models run eagerly here (only the step is compiled) to
keep Inductor compiles few. Also: the loop nests the clip adds to the step's kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._inductor import metrics
from torch._inductor.utils import run_and_get_code

import models
from compileclip import clip_backend
from harness import ACTIVE, INACTIVE, compare_with_eager, in_fresh_process, isolated, step_compiled  # noqa: F401
from models import OPTIMIZERS, loss_of

DIRECT = step_compiled(compile_model=False, direct=True)  # torch.compile(opt.step, backend=clip)


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def opt_of(name: str, foreach: bool | None):
    return lambda ms: [OPTIMIZERS[name](ms[0].parameters(), foreach)]


def supervised(micro_batches: int = 1):
    """zero_grad, ``micro_batches`` backwards into the same .grad, step."""
    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        opt.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            loss_of(model, torch.randn(6, 8)).backward()
        step()
    return run


def against_eager(make_opts, max_norm, *, make_model=models.mlp, run=None, **kwargs):
    """The step compiled with the clip (``DIRECT``), the model eager, 3 steps against eager."""
    return compare_with_eager(run or supervised(), lambda: [make_model()], make_opts, DIRECT,
                              max_norm=max_norm, **kwargs)


# -- every optimizer x implementation, clip active and inactive --------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["default", "foreach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_matches_eager(name, foreach, max_norm):
    side = against_eager(opt_of(name, foreach), max_norm)
    # the first call runs before its graph has proved itself: clipped at the pre-hook
    print("STATS", name, foreach, max_norm, dict(side.clip.stats))


def unclipped_grad_left(models_, opts, clip, steps, i):
    """step_writes_grad=False: the update of a clipped step, and ``.grad`` keeps the gradient
    as the backward left it. Eager: clip_grad_norm_, the step, then the unclipped .grad back."""
    (model,), (opt,), (step,) = models_, opts, steps
    opt.zero_grad(set_to_none=True)
    loss_of(model, torch.randn(6, 8)).backward()
    if clip is not None:
        step()
        return
    params = step.params()
    unclipped = [p.grad.clone() for p in params]
    step.clip_grads()
    opt.step()
    for p, g in zip(params, unclipped):
        p.grad = g
    step.record()  # what the compiled step must leave: eager's update, the unclipped .grad


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_no_grad_write_back(name, max_norm):
    """step_writes_grad=False: the same update; .grad keeps the unclipped gradient."""
    # .grad holds the unclipped gradient here, so the harness's tolerance for clipped ones (scaled
    # by the coefficient) does not apply: assert_close's defaults (tol={})
    side = against_eager(opt_of(name, True), max_norm, run=unclipped_grad_left, step_writes_grad=False, tol={})
    (model,) = side.models
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(norm, side.clip.total_norm)  # .grad still holds the pre-clip gradient


def test_aot_eager_inner(max_norm):
    against_eager(opt_of("adam", False), max_norm, inner="aot_eager")


def test_fuse_false_clips_eagerly_before_the_compiled_step(max_norm):
    side = against_eager(opt_of("sgd", True), max_norm, fuse=False)
    assert side.clip.stats == {"step_eager": 3, "norm_at_step": 3}, side.clip.stats


@pytest.mark.parametrize("norm_type", [1.0, 3.0, float("inf")], ids=["p1", "p3", "inf"])
def test_norm_types(norm_type, max_norm):
    against_eager(opt_of("adam", True), max_norm, norm_type=norm_type)


def refused_error_if_nonfinite():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch.compile(opt.step, backend=clip_backend(1.0, error_if_nonfinite=True))
    loss_of(model, torch.randn(2, 8)).backward()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="error_if_nonfinite=True is not supported"):
        step()


def test_error_if_nonfinite_is_refused_for_the_step():
    # in a fresh process: Dynamo keeps a backend that raised alive, and a live clip hears
    # every optimizer step of the process
    in_fresh_process(refused_error_if_nonfinite)


# -- parameter groups, frozen parameters, grads that are None ----------------------------------


class WithUnused(nn.Module):
    """A frozen layer and a layer the forward never uses (its .grad stays None)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(16, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.frozen(self.a(x))))


@pytest.mark.parametrize("foreach", [False, True], ids=["default", "foreach"])
def test_param_groups_and_none_grads(foreach, max_norm):
    def make_opts(ms):
        m = ms[0]
        return [torch.optim.AdamW(
            [
                {"params": [*m.a.parameters(), *m.frozen.parameters()], "lr": 1e-2},
                {"params": [*m.b.parameters(), *m.unused.parameters()], "lr": 3e-3, "weight_decay": 0.0},
            ],
            foreach=foreach,
        )]

    side = against_eager(make_opts, max_norm, make_model=WithUnused)
    (model,) = side.models
    assert model.unused.weight.grad is None and model.frozen.weight.grad is None


def test_sgd_param_groups(max_norm):
    def make_opts(ms):
        m = ms[0]
        return [torch.optim.SGD(
            [{"params": m[0].parameters()}, {"params": [*m[2].parameters(), *m[3].parameters()], "lr": 0.05}],
            lr=0.1, momentum=0.9,
        )]

    against_eager(make_opts, max_norm)


# -- hyperparameters as tensors: no recompile --------------------------------------------------


def test_tensor_lr_and_max_norm_change_without_recompile():
    lrs = [1e-2, 5e-3, 2e-3, 2e-2]
    norms = [0.05, 0.02, 1e6, 0.1]  # the clip active, active, inactive, active
    max_norm = torch.tensor(norms[0])  # the clip's and the eager reference's

    def make_opts(ms):
        # a tensor lr needs the default (for-loop) implementation unless capturable=True
        return [torch.optim.Adam(ms[0].parameters(), lr=torch.tensor(lrs[0]), foreach=False)]

    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        opt.param_groups[0]["lr"].fill_(lrs[i])
        max_norm.fill_(norms[i])
        opt.zero_grad(set_to_none=True)
        loss_of(model, torch.randn(6, 8)).backward()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # compiled once in step 0
            step()

    side = against_eager(make_opts, max_norm, run=run, iterations=len(lrs))
    active = [float(norm) > m for (_, norm), m in zip(side.steps[0].records, norms)]
    assert active == [True, True, False, True], active


# -- gradient accumulation: the step sees the final .grad --------------------------------------


def test_gradient_accumulation_needs_no_context_manager(max_norm):
    against_eager(opt_of("adamw", True), max_norm, run=supervised(micro_batches=3))


# -- the scale costs no loop of its own --------------------------------------------------------


def _step_kernels(name: str, foreach: bool, make_backend, amp: bool = False) -> tuple[int, str]:
    """Loop nests Inductor generates for the last compile of the step, and its code.
    ``make_backend(scaler)`` gives the backend (``scaler`` is a GradScaler with ``amp``)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))  # 4 gradients
    opt = OPTIMIZERS[name](model.parameters(), foreach)
    scaler = torch.amp.GradScaler("cpu") if amp else None
    step = torch.compile(opt.step, backend=make_backend(scaler))
    for _ in range(2):  # SGD compiles again once its momentum buffers exist
        loss = loss_of(model, torch.randn(3, 8))
        (scaler.scale(loss) if amp else loss).backward()
        metrics.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            _, code = run_and_get_code(step)
        if amp:
            scaler.update()
    return metrics.generated_kernel_count, code[-1]


@pytest.mark.parametrize("name,foreach", [("sgd", False), ("adam", True)])
def test_clip_adds_only_the_norm_loops(name, foreach):
    """Measured on CPU (torch 2.13): SGD 4 loop nests without the clip, 5 with it; Adam 8
    and 9. The norm is one extern call (``compileclip::total_norm``), plus one scalar loop
    nest (coefficient and nonfinite flag), whatever the number of gradients. The scale and
    the write-back into .grad are computed and stored inside the optimizer's own update
    loops: no loop nest re-reads the gradients for the scale, with or without the
    write-back. Neither does the nonfinite skip (a select in the update loops), GradScaler's
    unscale (inside the norm operator and the update loops; its inverse scale is one more
    scalar loop), nor value clipping (SGD 4, Adam 8 with clip_value
    alone)."""
    plain, _ = _step_kernels(name, foreach, lambda s: "inductor")
    clipped, code = _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE))
    assert clipped == plain + 1, (plain, clipped)
    assert code.count("torch.ops.compileclip.norms_and_total.default(") == 1
    same_as_clipped = {
        "no write-back": _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE, step_writes_grad=False)),
        "skip_nonfinite": _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE, skip_nonfinite=True)),
        "GradScaler + clip_value": _step_kernels(
            name, foreach, lambda s: clip_backend(ACTIVE, clip_value=1e-3, scaler=s), amp=True
        ),
    }
    for what, (count, _) in same_as_clipped.items():
        # GradScaler: one more scalar loop, the inverse scale
        assert count == clipped + (what.startswith("GradScaler")), (what, count, clipped)
    value_only, _ = _step_kernels(name, foreach, lambda s: clip_backend(clip_value=1e-3))
    assert value_only == plain, (value_only, plain)


def test_step_writes_grad_is_validated():
    with pytest.raises(TypeError, match="step_writes_grad"):
        clip_backend(1.0, step_writes_grad="yes")


class _Globals:
    """The model and optimizer of ``_whole_step``: module globals, never locals of its frames."""

    model: nn.Module
    opt: torch.optim.Optimizer


def _whole_step(x):
    _Globals.opt.zero_grad(set_to_none=True)
    loss_of(_Globals.model, x).backward()
    _Globals.opt.step()


def test_whole_train_step_compiled_with_a_global_optimizer(max_norm):
    """``torch.compile(train_step, backend=clip)`` of forward, backward and ``opt.step()``, the
    optimizer a global that is never a local of the compiled frames: the step's graph is found
    to be ``opt``'s (Dynamo resumes inside torch's ``Optimizer.step`` wrapper, after the clip's
    step hook), so it neither clips twice nor leaves the step unclipped."""
    compiled: dict = {}

    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        x = torch.randn(6, 8)
        if clip is None:
            opt.zero_grad(set_to_none=True)
            loss_of(model, x).backward()
            step()
            return
        _Globals.model, _Globals.opt = model, opt
        compiled.setdefault("fn", torch.compile(_whole_step, backend=clip))(x)
        step.record()

    from harness import Step

    side = compare_with_eager(run, lambda: [models.mlp()], opt_of("adam", True),
                              lambda ms, os, make: (ms, [Step(o, make()) for o in os]),
                              max_norm=max_norm, iterations=4)
    # the first step before its graph has run (clipped at the pre-hook), the others in the graph
    assert side.clip.stats["step_in_graph"] == 3 and side.clip.stats["step_eager"] == 1, side.clip.stats
    del _Globals.model, _Globals.opt
