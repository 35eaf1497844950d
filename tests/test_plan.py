"""The step plan as a table: ``plan.plan_step`` is a pure function of plain facts."""

from __future__ import annotations

import pytest

from compileclip.plan import Action, Clipped, StepFacts, StepPlan, Unscale, plan_step

F = StepFacts
EAGER = StepPlan(Action.EAGER, use_backward=True)
IN_GRAPH = StepPlan(Action.IN_GRAPH, use_backward=True)
COMPILED = dict(compiled_frame=True, graph_ready=True)

TABLE = [
    # -- not this clip's to clip
    ("nested step (ZeRO's inner optimizer)", F(nested=True), StepPlan(Action.NONE)),
    ("attached with parameters=[]", F(excluded=True), StepPlan(Action.NONE)),
    ("no gradient", F(grads=0), StepPlan(Action.NONE)),
    # -- the group's second optimizer in one backward
    ("already clipped by the group", F(clipped=Clipped.ALL), StepPlan(Action.ALREADY)),
    ("already clipped, skip_nonfinite", F(clipped=Clipped.ALL, skip_nonfinite=True),
     StepPlan(Action.ALREADY, sync_skip=True)),
    ("already clipped, attached scaler", F(clipped=Clipped.ALL, scaler_stage="UNSCALED"),
     StepPlan(Action.ALREADY, sync_skip=True)),
    ("some clipped, the rest never in that clip", F(clipped=Clipped.MIXED, group_grew=True), Action.RAISE),
    ("some clipped, the rest changed since", F(clipped=Clipped.MIXED), EAGER),
    # -- eager
    ("plain eager step", F(), EAGER),
    ("records not trusted (collectives, GradScaler)", F(trusted=False), StepPlan(Action.EAGER)),
    ("fuse=False", F(fuse=False), StepPlan(Action.EAGER)),
    ("DTensor gradients", F(dtensor=True), StepPlan(Action.EAGER)),
    ("skip_nonfinite, eager", F(skip_nonfinite=True), StepPlan(Action.EAGER, use_backward=True, sync_skip=True)),
    ("sparse gradients", F(sparse=True), Action.RAISE),
    # -- a fused optimizer's kernel takes the coefficient (opt.grad_scale)
    ("fused kernel", F(fused_kernel=True), StepPlan(Action.EAGER, use_backward=True, fold=True)),
    ("fused kernel, GradScaler's grad_scale set", F(fused_kernel=True, grad_scale_set=True),
     StepPlan(Action.EAGER, unscale=Unscale.GRAD_SCALE, fold=True)),
    ("fused kernel, attached scaler", F(fused_kernel=True, scaler_stage="READY"),
     StepPlan(Action.EAGER, use_backward=True, unscale=Unscale.SCALER, sync_skip=True, fold=True)),
    ("fused kernel, skip_nonfinite: found_inf", F(fused_kernel=True, skip_nonfinite=True),
     StepPlan(Action.EAGER, use_backward=True, fold=True, kernel_skip=True)),
    ("fused kernel, skip_nonfinite, attached scaler", F(fused_kernel=True, skip_nonfinite=True, scaler_stage="READY"),
     StepPlan(Action.EAGER, use_backward=True, unscale=Unscale.SCALER, sync_skip=True, fold=True)),
    ("fused kernel, a group of two optimizers", F(fused_kernel=True, group_is_step=False), EAGER),
    ("fused kernel, AGC or clip_value", F(fused_kernel=True, scale_only=False), EAGER),
    ("fused kernel, DTensor", F(fused_kernel=True, dtensor=True), StepPlan(Action.EAGER)),
    ("fused kernel, fuse=False", F(fused_kernel=True, fuse=False), StepPlan(Action.EAGER)),
    ("fused kernel, norm not computed", F(fused_kernel=True, computes_norm=False), EAGER),
    ("fused kernel, closure", F(fused_kernel=True, closure=True), StepPlan(Action.AFTER_CLOSURE, use_backward=True)),
    # -- closures
    ("closure", F(closure=True), StepPlan(Action.AFTER_CLOSURE, use_backward=True)),
    ("closure, no gradient before it", F(closure=True, grads=0), StepPlan(Action.AFTER_CLOSURE, use_backward=True)),
    ("closure after a clipped step", F(closure=True, clipped=Clipped.ALL), StepPlan(Action.AFTER_CLOSURE, use_backward=True)),
    ("closure, not trusted", F(closure=True, trusted=False), StepPlan(Action.AFTER_CLOSURE)),
    # -- compiled steps
    ("compiled step, graph not run yet", F(compiled_frame=True), EAGER),
    ("compiled step graph", F(**COMPILED), IN_GRAPH),
    ("compiled step, backward covers it", F(**COMPILED, backward_covers_step=True),
     StepPlan(Action.IN_GRAPH, use_backward=True, hand_norm=True)),
    ("compiled step, not trusted", F(**COMPILED, backward_covers_step=True, trusted=False), StepPlan(Action.IN_GRAPH)),
    ("compiled step, group of two optimizers", F(**COMPILED, group_is_step=False),
     StepPlan(Action.IN_GRAPH, use_backward=True, hand_norm=True)),
    ("compiled step, group of two, DTensor", F(**COMPILED, group_is_step=False, dtensor=True), StepPlan(Action.EAGER)),
    ("compiled step, fuse=False", F(**COMPILED, fuse=False), StepPlan(Action.EAGER)),
    ("step from eager code", F(graph_ready=True), EAGER),
    # -- GradScaler
    ("attached scaler, eager step: stands in for scaler.step", F(scaler_stage="READY"),
     StepPlan(Action.EAGER, use_backward=True, unscale=Unscale.SCALER, sync_skip=True)),
    ("attached scaler, already unscaled", F(scaler_stage="UNSCALED"), EAGER),
    ("attached scaler, stepped twice", F(scaler_stage="STEPPED"), Action.RAISE),
    ("attached scaler, compiled step unscales in the graph", F(**COMPILED, scaler_stage="READY"), IN_GRAPH),
    ("attached scaler, group of two, compiled", F(**COMPILED, scaler_stage="READY", group_is_step=False),
     StepPlan(Action.EAGER, use_backward=True, unscale=Unscale.SCALER, sync_skip=True)),
    ("fused optimizer under GradScaler.step", F(grad_scale_set=True), StepPlan(Action.EAGER, unscale=Unscale.GRAD_SCALE)),
]


@pytest.mark.parametrize("facts,expected", [(f, e) for _, f, e in TABLE], ids=[n for n, _, _ in TABLE])
def test_plan(facts, expected):
    plan = plan_step(facts)
    if expected is Action.RAISE:
        assert plan.action is Action.RAISE and plan.error.startswith("compileclip: ")
    else:
        assert plan == expected


def test_errors_name_the_optimizer_and_the_way_out():
    plan = plan_step(F(clipped=Clipped.MIXED, group_grew=True, optimizer="AdamW", scope="GPT"))
    assert "AdamW" in plan.error and "GPT" in plan.error and "clip.attach(" in plan.error
