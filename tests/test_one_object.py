"""One clip object for model and step, and ``clip.compile_step``: the backward computes the
norm, the compiled step folds the coefficient into its update; the step never runs unclipped.
Each loop against eager ``clip_grad_norm_(params, max_norm); opt.step()`` with the clip active
and inactive (``harness.py``), with the counters that show where the clip ran and which norm it
used: micro-batches, gradients edited between backward and step (in place, by tensor hooks,
by ``torch.autograd.grad``), a graph break, dynamic shapes, forward, backward and step in one
``torch.compile``, Dynamo's recompile limit; and the kernels and recompiles it costs."""

from __future__ import annotations

import gc
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch._inductor import metrics

import models
from harness import (ACTIVE, INACTIVE, Step, compare_with_eager, in_fresh_process, isolated, new_clip,  # noqa: F401
                     step_compiled)
from models import OPTIMIZERS, GraphBreak, loss_of

ONE_OBJECT = step_compiled(compile_model=True, direct=True)  # the model and opt.step, one clip


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def opt_of(name: str, foreach: bool):
    return lambda ms: [OPTIMIZERS[name](ms[0].parameters(), foreach)]


def supervised(micro_batches: int = 1, edit_from: int | None = None, batches=None):
    """zero_grad, ``micro_batches`` backwards, from iteration ``edit_from`` on the first
    parameter's .grad doubled in place, step. ``batches``: the batch size of each iteration."""
    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        opt.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            loss_of(model, torch.randn(batches[i] if batches else 6, 8)).backward()
        if edit_from is not None and i >= edit_from:
            next(iter(model.parameters())).grad.mul_(2.0)
        step()
    return run


def stats(side) -> Counter:
    """The clip's counters; 0 for those it never counted."""
    return Counter(side.clip.stats)


# -- one object for model and step: clipped exactly once per step -----------------------------


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_one_object_for_model_and_step(micro_batches, max_norm):
    side = compare_with_eager(supervised(micro_batches), lambda: [models.mlp()], opt_of("sgd", False), ONE_OBJECT,
                              max_norm=max_norm)
    # the first step runs before its graph exists (torch.compile(opt.step) directly), so the
    # hook clips it eagerly; later steps clip in the graph. The backward's norm is used
    # unless the gradients were accumulated (from the very first step: issue 8, setup 11)
    s = stats(side)
    assert s["step_eager"] == 1 and s["step_in_graph"] == 2, s
    assert s["norm_from_backward"] == (3 if micro_batches == 1 else 0), s


@pytest.mark.parametrize("case", ["grad_changed_before_step", "graph_break"])
def test_one_object_declines_the_backward_norm(case, max_norm):
    """Where the backward's norm is not the norm of exactly the gradients the step sees,
    the step computes its own, and the result still matches eager."""
    if case == "graph_break":  # each graph's norm covers its own parameters: combined
        run, make, from_backward = supervised(), GraphBreak, 3
    else:  # from the second step on the gradients were edited
        run, make, from_backward = supervised(edit_from=1), models.mlp, 1
    side = compare_with_eager(run, lambda: [make()], opt_of("adam", True), ONE_OBJECT, max_norm=max_norm)
    assert stats(side)["norm_from_backward"] == from_backward, side.clip.stats


def test_one_object_compiles_the_other_step_variant_when_first_needed(max_norm):
    """The step graph compiles the variant its first call needs (here: taking the backward's
    norm) and the other one when a later step first needs it (here: step 3, whose gradients
    were edited after the backward, so the step computes the norm itself). Compiled at run
    time, outside Dynamo's tracing, from the call's real inputs; the steps match eager."""
    side = compare_with_eager(supervised(edit_from=3), lambda: [models.mlp()], opt_of("adam", True), ONE_OBJECT,
                              max_norm=max_norm, iterations=5)
    s = stats(side)
    assert s["norm_from_backward"] == 3 and s["step_in_graph"] == 4, s


def _halve_grad_in_place(p: torch.Tensor) -> None:
    p.grad.mul_(0.5)


def edited_gradients(case: str):
    """Gradients that reach .grad other than straight from the backward graph."""
    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        first = next(iter(model.parameters()))
        if i == 0 and case == "tensor_hook":
            first.register_hook(lambda g: g * 0.5)
        elif i == 0 and case == "post_accumulate_hook":
            first.register_post_accumulate_grad_hook(_halve_grad_in_place)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, torch.randn(6, 8))
        if case == "autograd_grad":
            params = list(model.parameters())
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = 3.0 * g
        else:
            loss.backward()
        step()
    return run


@pytest.mark.parametrize("case", ["autograd_grad", "tensor_hook", "post_accumulate_hook"])
def test_one_object_hand_off_declined_for_gradient_edits(case, max_norm):
    """Gradients that reach .grad other than straight from the backward graph: computed with
    torch.autograd.grad and assigned, or changed by the user's own hooks. The backward's
    norm is not handed on, and the result is eager's."""
    side = compare_with_eager(edited_gradients(case), lambda: [models.mlp()], opt_of("sgd", False), ONE_OBJECT,
                              max_norm=max_norm)
    assert stats(side)["norm_from_backward"] == 0, side.clip.stats


def test_one_object_norm_in_backward_coefficient_in_step():
    """One clip object for model and step: the backward computes the norm and leaves the
    gradients alone, and the step runs a variant that takes that norm as an input (stats'
    norm_from_backward).

    Loop nests measured on CPU (torch 2.13), 2-layer MLP (4 gradients), SGD with momentum:
    backward 3 plain and 3 with the norm (one extern call of compileclip::total_norm, no
    loop nest; the backward never scales). The step compiles only the variant it needs: the
    one taking the norm (plain 4 + 1 scalar kernel for the coefficient and the nonfinite
    flag); before issue 9 it compiled the norm-computing variant too (14 loop nests in all).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = OPTIMIZERS["sgd"](model.parameters(), False)
    clip = new_clip(max_norm=ACTIVE)
    forward, step = torch.compile(model, backend=clip), torch.compile(opt.step, backend=clip)
    counts = []
    with torch._inductor.config.patch(fx_graph_cache=False):
        for _ in range(3):
            loss = loss_of(forward, torch.randn(3, 8))
            metrics.reset()
            loss.backward()
            backward = metrics.generated_kernel_count
            metrics.reset()
            step()
            counts.append((backward, metrics.generated_kernel_count))
            opt.zero_grad()
    # step 0: the backward and the step; step 1: the step compiles again once SGD's
    # momentum buffers exist; step 2: nothing compiles
    assert counts == [(3, 5), (0, 5), (0, 0)], counts
    # step 0 is clipped by the hook (its graph did not exist yet) with the backward's norm too
    assert clip.stats["norm_from_backward"] == 3, clip.stats


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_one_object_dynamic_shapes(inner, max_norm):
    """Batch sizes that change every step under dynamic=True: the norm-computing backward and
    the norm-taking step variant still match eager."""
    batches = [3, 5, 7, 9, 4]
    side = compare_with_eager(supervised(batches=batches), lambda: [models.mlp()], opt_of("adamw", True),
                              step_compiled(compile_model=True, direct=True, dynamic=True),
                              max_norm=max_norm, iterations=len(batches), inner=inner)
    # every step used the backward's norm (the first one in the hook, its graph not yet built)
    assert stats(side)["norm_from_backward"] == 5, side.clip.stats


def whole_step_compiled(models_, opts, make):
    """One ``torch.compile`` with the clip over zero_grad, forward, backward and the step."""
    clip = make()
    (model,), (opt,) = models_, opts

    @torch.compile(backend=clip)
    def train_step(x):
        opt.zero_grad()
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        return loss

    return [train_step], [Step(opt, clip)]


def whole_step_loop(models_, opts, clip, steps, i):
    (f,), (opt,), (step,) = models_, opts, steps
    x = torch.randn(6, 8)
    if clip is None:  # eager: the same body, clip_grad_norm_ right before the step
        opt.zero_grad()
        loss_of(f, x).backward()
        step()
    else:
        f(x)  # the compiled train step: the optimizer steps inside it
        step.record()


def test_whole_training_step_compiled_with_the_clip(max_norm):
    """One torch.compile over zero_grad, forward, backward and step: Dynamo splits it at
    backward() and at the optimizer's own graph breaks, and the one backend sees the model
    graph and the step graph, as with two compiles of one object."""
    side = compare_with_eager(whole_step_loop, lambda: [models.mlp()], opt_of("adamw", True), whole_step_compiled,
                              max_norm=max_norm, iterations=4)
    assert stats(side)["norm_from_backward"] == 4, side.clip.stats


# -- clip.compile_step: the step never runs unclipped -----------------------------------------


def record_skipped(step: Step) -> None:
    """Eager's skipped step: what it leaves, as ``Step.record`` would record it (whose check
    that the step left .grad alone compares with torch.equal, false for nan)."""
    step.records.append(([None if p.grad is None else p.grad.clone() for p in step.params()],
                         step.reference.last_norm))


def fallback_loop(nan_at: int | None):
    """Steps 0 and 1 compiled; from step 2 on Dynamo is at its recompile limit for the step
    (and falls back to running it eagerly). A nan in the input of step ``nan_at``."""
    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        opt.zero_grad(set_to_none=True)
        x = torch.randn(6, 8)
        if i == nan_at:
            x[0, 0] = math.nan
        loss_of(model, x).backward()
        if clip is None:  # eager: clip_grad_norm_; skip_nonfinite: no step for a nonfinite norm
            step.clip_grads()
            if torch.isfinite(step.reference.last_norm):
                step.raw()
            else:
                record_skipped(step)
        elif i < 2:
            step()
        else:
            torch._dynamo.reset()
            with torch._dynamo.config.patch(recompile_limit=0):
                step()
    return run


def fallback_scenario(skip_nonfinite: bool, max_norm: float) -> None:
    side = compare_with_eager(fallback_loop(3 if skip_nonfinite else None), lambda: [models.mlp()],
                              opt_of("adam", True), step_compiled(compile_model=False), max_norm=max_norm,
                              iterations=4, tol={"equal_nan": True} if skip_nonfinite else None,
                              skip_nonfinite=skip_nonfinite)
    # step 0 at the pre-hook (its graph not yet proved), step 1 in the graph, steps 2 and 3
    # eagerly at the recompile limit; the model runs eagerly: every norm taken at the step
    assert side.clip.stats == {"step_eager": 3, "step_in_graph": 1, "step_recompile_limit": 2,
                               "norm_at_step": 3}, side.clip.stats
    assert int(side.clip.skipped_steps) == (1 if skip_nonfinite else 0)


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["clip", "skip"])
def test_compile_step_clips_eagerly_when_dynamo_falls_back(skip_nonfinite, max_norm):
    """At Dynamo's recompile limit compile_step's call raises inside Dynamo instead of running
    the step uncompiled; the step then runs eagerly, clipped (or skipped) by the hook. In a
    fresh process: after the fallback Dynamo keeps the clip alive (torch._dynamo.reset() and
    gc.collect() do not free it), and a live clip hears every optimizer step of the process."""
    in_fresh_process(fallback_scenario, skip_nonfinite, max_norm)


def test_compile_step_costs_no_recompile():
    """The pre-hook is registered before the first trace: the same graphs compile as with
    torch.compile(opt.step, backend=clip)."""
    counts = []
    for use_compile_step in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = models.mlp()
        opt = OPTIMIZERS["sgd"](model.parameters(), False)
        clip = new_clip(max_norm=ACTIVE)
        step = clip.compile_step(opt) if use_compile_step else torch.compile(opt.step, backend=clip)
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for _ in range(3):
            loss_of(model, torch.randn(6, 8)).backward()
            step()
            opt.zero_grad()
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert counts[0] == counts[1], counts


def test_compile_step_runs_the_other_step_hooks_and_lr_schedulers():
    """compile_step compiles the optimizer's own step and does the work of torch's
    ``Optimizer.step`` wrapper itself: the other global and per-optimizer step hooks run once
    per step, in torch's order, and an LR scheduler made before or after it sees the step (no
    "lr_scheduler.step() before optimizer.step()" warning; the schedule advances)."""
    import warnings

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    torch.manual_seed(0)
    model = models.mlp()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), foreach=False)
    clip = new_clip(max_norm=ACTIVE)
    before = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    step = clip.compile_step(opt)
    after = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda k: 1.0)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                loss_of(model, torch.randn(6, 8)).backward()
                step()
                before.step()
                after.step()
                opt.zero_grad()
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", "post", "global post"] * 3, calls
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01 * 0.5 ** 3)
    assert clip.stats["step_in_graph"] == 2, clip.stats


def test_one_object_compiles_the_step_once(monkeypatch):
    """Model and step compiled with one clip: the first step is clipped at the pre-hook (its
    graph has not run yet) and runs the graph disabled; the variant compiled for it is the one
    later steps use (the backward's norm handed in), so Inductor compiles the step once."""
    from compileclip import step as step_module

    compiled = []
    real = step_module.compile_graph
    monkeypatch.setattr(step_module, "compile_graph", lambda *a, **k: compiled.append(1) or real(*a, **k))
    side = compare_with_eager(supervised(), lambda: [models.mlp()], opt_of("adam", True), ONE_OBJECT,
                              max_norm=ACTIVE, iterations=4)
    assert stats(side) == {"backward_graph_runs": 4, "step_eager": 1, "norm_from_backward": 4, "step_in_graph": 3}
    assert len(compiled) == 1, len(compiled)


def test_compile_step_validates_its_argument():
    with pytest.raises(TypeError, match="compile_step needs a torch.optim.Optimizer, got Linear"):
        new_clip(max_norm=1.0).compile_step(nn.Linear(2, 2))


def test_clips_made_and_collected_between_steps_cost_no_recompile(max_norm):
    """The traced part of torch's step hooks reads no state of compileclip: another clip object
    appearing or being garbage-collected must not recompile the compiled step, nor touch the
    steps of either copy (the eager copy's too: the harness checks its .grad)."""
    others = []

    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        opt.zero_grad(set_to_none=True)
        loss_of(model, torch.randn(6, 8)).backward()
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            step()
        if i % 2:  # the number of live clips changes at every step
            others.append(new_clip(max_norm=1.0))
        else:
            others.clear()
            gc.collect()

    compare_with_eager(run, lambda: [models.mlp()], opt_of("adam", True), step_compiled(compile_model=False),
                       max_norm=max_norm, iterations=5)
