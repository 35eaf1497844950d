"""One clip object for model and step, and ``clip.compile_step``: the backward computes the
norm, the compiled step folds the coefficient into its update; the step never runs unclipped.
Shares the eager-comparison helpers of ``test_step.py``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch._inductor import metrics

from compileclip import clip_backend
from helpers import ACTIVE, INACTIVE, assert_clip_state
from models import GraphBreak
from test_step import OPTIMIZERS, assert_same, assert_state_close, loss_of, small_mlp, train_against_eager

# -- one object for model and step: clipped exactly once per step -----------------------------


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_one_object_for_model_and_step(micro_batches, max_norm):
    _, clip = train_against_eager(
        lambda m: OPTIMIZERS["sgd"](m.parameters(), False), max_norm=max_norm, steps=3,
        compile_model=True, micro_batches=micro_batches,
    )
    # the first step runs before its graph exists (torch.compile(opt.step) directly), so the
    # hook clips it eagerly; later steps clip in the graph. The backward's norm is used
    # unless the gradients were accumulated (from the very first step: issue 8, setup 11)
    assert clip.stats["step_eager"] == 1 and clip.stats["step_in_graph"] == 2, clip.stats
    assert clip.stats.get("norm_from_backward", 0) == (3 if micro_batches == 1 else 0), clip.stats


def _double_first_grad_after_step_0():
    calls = []

    def before_step(model: nn.Module) -> None:
        calls.append(model)
        if len(calls) > 2:
            next(iter(model.parameters())).grad.mul_(2.0)

    return before_step


@pytest.mark.parametrize("case", ["grad_changed_before_step", "graph_break"])
def test_one_object_declines_the_backward_norm(case):
    """Where the backward's norm is not the norm of exactly the gradients the step sees,
    the step computes its own, and the result still matches eager."""
    kwargs = {}
    make_opt = lambda m: OPTIMIZERS["adam"](m.parameters(), True)  # noqa: E731
    if case == "grad_changed_before_step":
        kwargs["before_step"] = _double_first_grad_after_step_0()
    else:
        kwargs["make_model"] = GraphBreak
    _, clip = train_against_eager(make_opt, compile_model=True, **kwargs)
    if case == "graph_break":  # each graph's norm covers its own parameters: combined
        assert clip.stats["norm_from_backward"] == 3, clip.stats
    else:  # from the second step on the gradients were edited
        assert clip.stats["norm_from_backward"] == 1, clip.stats


def test_one_object_compiles_the_other_step_variant_when_first_needed():
    """The step graph compiles the variant its first call needs (here: taking the backward's
    norm) and the other one when a later step first needs it (here: step 3, whose gradients
    were edited after the backward, so the step computes the norm itself). Compiled at run
    time, outside Dynamo's tracing, from the call's real inputs; the steps match eager."""
    calls = []

    def before_step(model: nn.Module) -> None:
        calls.append(model)
        if len(calls) > 6:  # called for the model and for the eager reference: steps 3 and 4
            next(iter(model.parameters())).grad.mul_(2.0)

    _, clip = train_against_eager(
        lambda m: OPTIMIZERS["adam"](m.parameters(), True), compile_model=True, steps=5,
        before_step=before_step,
    )
    assert clip.stats["norm_from_backward"] == 3 and clip.stats["step_in_graph"] == 4, clip.stats


def _halve_grad_in_place(p: torch.Tensor) -> None:
    p.grad.mul_(0.5)


@pytest.mark.parametrize("case", ["autograd_grad", "tensor_hook", "post_accumulate_hook"])
def test_one_object_hand_off_declined_for_gradient_edits(case):
    """Gradients that reach .grad other than straight from the backward graph: computed with
    torch.autograd.grad and assigned, or changed by the user's own hooks. The backward's
    norm is not handed on, and the result is eager's."""
    torch.manual_seed(0)
    model = small_mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = OPTIMIZERS["sgd"](model.parameters(), False), OPTIMIZERS["sgd"](ref.parameters(), False)
    clip = clip_backend(max_norm=ACTIVE)
    for m in (model, ref):
        if case == "tensor_hook":
            m[0].weight.register_hook(lambda g: g * 0.5)
        elif case == "post_accumulate_hook":
            m[0].weight.register_post_accumulate_grad_hook(_halve_grad_in_place)
    forward, step = torch.compile(model, backend=clip), torch.compile(opt.step, backend=clip)
    if True:
        for i in range(3):
            x = torch.randn(6, 8)
            for m, fwd in ((model, forward), (ref, ref)):
                loss = loss_of(fwd, x)
                if case == "autograd_grad":
                    grads = torch.autograd.grad(loss, list(m.parameters()))
                    for p, g in zip(m.parameters(), grads):
                        p.grad = 3.0 * g
                else:
                    loss.backward()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
            ref_opt.step()
            step()
            assert_same(model, ref, opt, ref_opt, clip, ref_norm, f"step {i}")
            opt.zero_grad()
            ref_opt.zero_grad()
    assert clip.stats.get("norm_from_backward", 0) == 0, clip.stats



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
    clip = clip_backend(ACTIVE)
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
def test_one_object_dynamic_shapes(inner):
    """Batch sizes that change every step under dynamic=True: the norm-computing backward and
    the norm-taking step variant still match eager."""
    torch.manual_seed(0)
    model = small_mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = OPTIMIZERS["adamw"](model.parameters(), True), OPTIMIZERS["adamw"](ref.parameters(), True)
    clip = clip_backend(max_norm=ACTIVE, inner=inner)
    forward = torch.compile(model, backend=clip, dynamic=True)
    step = torch.compile(opt.step, backend=clip)
    for i, batch in enumerate([3, 5, 7, 9, 4]):
        x = torch.randn(batch, 8)
        loss_of(forward, x).backward()
        loss_of(ref, x).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
        assert_clip_state(ref_norm, ACTIVE)
        ref_opt.step()
        step()
        assert_same(model, ref, opt, ref_opt, clip, ref_norm, f"step {i}")
        opt.zero_grad()
        ref_opt.zero_grad()
    # every step used the backward's norm (the first one in the hook, its graph not yet built)
    assert clip.stats["norm_from_backward"] == 5, clip.stats


def test_whole_training_step_compiled_with_the_clip():
    """One torch.compile over forward, backward, step and zero_grad: Dynamo splits it at
    backward() and at the optimizer's own graph breaks, and the one backend sees the model
    graph and the step graph, as with two compiles of one object."""
    torch.manual_seed(0)
    model = small_mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = OPTIMIZERS["adamw"](model.parameters(), True), OPTIMIZERS["adamw"](ref.parameters(), True)
    clip = clip_backend(max_norm=ACTIVE)

    @torch.compile(backend=clip)
    def train_step(x):
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    for i in range(4):
        x = torch.randn(6, 8)
        train_step(x)
        loss_of(ref, x).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
        assert_clip_state(ref_norm, ACTIVE)
        ref_opt.step()
        ref_opt.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"step {i}: {m}")
        assert_state_close(opt, ref_opt, f"step {i}")
        torch.testing.assert_close(clip.total_norm, ref_norm)
    assert clip.stats["norm_from_backward"] == 4, clip.stats


# -- clip.compile_step: the step never runs unclipped -----------------------------------------


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["clip", "skip"])
def test_compile_step_clips_eagerly_when_dynamo_falls_back(skip_nonfinite):
    """At Dynamo's recompile limit compile_step's call raises inside Dynamo instead of running
    the step uncompiled; the step then runs eagerly, clipped (or skipped) by the hook."""
    torch.manual_seed(0)
    model = small_mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = OPTIMIZERS["adam"](model.parameters(), True), OPTIMIZERS["adam"](ref.parameters(), True)
    clip = clip_backend(max_norm=ACTIVE, skip_nonfinite=skip_nonfinite)
    step = clip.compile_step(opt)
    for i in range(4):
        x = torch.randn(6, 8)
        if skip_nonfinite and i == 3:
            x[0, 0] = float("nan")
        loss_of(model, x).backward()
        loss_of(ref, x).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
        if torch.isfinite(ref_norm):
            ref_opt.step()
        if i < 2:
            step()
        else:  # Dynamo falls back to eager for this frame from now on
            torch._dynamo.reset()
            with torch._dynamo.config.patch(recompile_limit=0):
                step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"step {i}: {m}")
        assert_state_close(opt, ref_opt, f"step {i}")
        torch.testing.assert_close(clip.total_norm, ref_norm, equal_nan=True)
        opt.zero_grad()
        ref_opt.zero_grad()
    if skip_nonfinite:
        assert int(clip.skipped_steps) == 1
    assert clip.stats["step_recompile_limit"] == 2, clip.stats


def test_compile_step_costs_no_recompile():
    """The pre-hook is registered before the first trace: the same graphs compile as with
    torch.compile(opt.step, backend=clip)."""
    counts = []
    for use_compile_step in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = small_mlp()
        opt = OPTIMIZERS["sgd"](model.parameters(), False)
        clip = clip_backend(max_norm=ACTIVE)
        step = clip.compile_step(opt) if use_compile_step else torch.compile(opt.step, backend=clip)
        before = _graphs_compiled()
        for _ in range(3):
            loss_of(model, torch.randn(6, 8)).backward()
            step()
            opt.zero_grad()
        counts.append(_graphs_compiled() - before)
    assert counts[0] == counts[1], counts


def test_compile_step_validates_its_argument():
    with pytest.raises(TypeError, match="compile_step needs a torch.optim.Optimizer, got Linear"):
        clip_backend(1.0).compile_step(nn.Linear(2, 2))


def test_clips_made_and_collected_between_steps_cost_no_recompile():
    """The traced part of torch's step hooks reads no state of compileclip: another clip object
    appearing or being garbage-collected must not recompile the compiled step."""
    import gc

    model = small_mlp()
    opt = OPTIMIZERS["adam"](model.parameters(), True)
    step = clip_backend(max_norm=ACTIVE).compile_step(opt)
    others = []
    for i in range(5):
        loss_of(model, torch.randn(6, 8)).backward()
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            step()
        opt.zero_grad()
        if i % 2:  # the number of live clips changes at every step
            others.append(clip_backend(max_norm=1.0))
        else:
            others.clear()
            gc.collect()
