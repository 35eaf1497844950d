"""The step plan: what the clip does at one optimizer step, decided by one pure function.

The life of a step, as torch's global step hooks see it (``hooks.py``)::

    pre-hook  ->  facts (runtime.StepRuntime.facts)  ->  plan_step(facts)  ->  carry it out
    [the optimizer's step: eager, fused, or a compiled step graph that reads the plan]
    post-hook ->  close the step: mark the group's gradients clipped, undo a skip

``plan_step`` takes plain facts (flags and counts, no tensors) and returns a frozen
``StepPlan``; the hooks, the compiled step and the eager clip only carry it out
(``runtime.py``, ``step.py``). It is tested as a table (``tests/test_plan.py``).

Actions:

- ``NONE``: not this clip's to clip (a step nested in one of its open steps, such as
  ``ZeroRedundancyOptimizer``'s inner step; an optimizer attached with no parameters; a step
  with no gradient).
- ``ALREADY``: the step's gradients were clipped for this backward by an earlier step of the
  same group and are unchanged since (the second of two optimizers of one model).
- ``EAGER``: clip the group now, before the optimizer runs: the norm from the backward graphs
  where their records prove it is the norm of the final ``.grad``, computed here for the rest;
  one ``_foreach_mul_`` per device and dtype, or (``fold``) none: a fused optimizer's kernel
  divides by the reciprocal of the coefficient, handed to it as ``opt.grad_scale``; with
  ``skip_nonfinite`` (``kernel_skip``) the nonfinite flag goes in as ``opt.found_inf``, on
  which the kernel skips the update: no host read.
- ``IN_GRAPH``: the step graph this clip compiled clips its optimizer's gradients inside the
  update loop; the group's norm is handed to it when it cannot compute it alone (other
  optimizers' gradients, or the backward's norms), and the group's other gradients are scaled
  here.
- ``AFTER_CLOSURE``: ``opt.step(closure)``: the backward runs inside the step, so the clip
  (``EAGER``) runs when the closure returns.
- ``RAISE``: what eager would do cannot be known: the error, before anything is updated.
"""

from __future__ import annotations

import enum
import functools
import typing


class Action(enum.Enum):
    NONE = "none"
    ALREADY = "already_clipped"
    EAGER = "eager"
    IN_GRAPH = "in_graph"
    AFTER_CLOSURE = "after_closure"
    RAISE = "raise"


class Clipped(enum.Enum):
    """The step's gradients against the group's last clip in this backward."""

    NONE = "none"  # none of them was clipped (a new backward), or no clip yet
    ALL = "all"  # every one, unchanged since
    MIXED = "mixed"  # some clipped and unchanged, others never part of that clip


class Unscale(enum.Enum):
    """What the step does about a GradScaler."""

    NONE = "none"
    SCALER = "scaler"  # the attached scaler's unscale_(opt): the step stands in for scaler.step
    GRAD_SCALE = "grad_scale"  # GradScaler.step set opt.grad_scale (fused): unscale, then clear it


class StepFacts(typing.NamedTuple):
    """Plain facts about one optimizer step of a clip that owns it. (A named tuple: made at
    every step, four times faster than a frozen dataclass, and hashable: ``plan_step`` is
    memoized on it.)"""

    nested: bool = False  # another step of this clip is open
    grads: int = 1  # gradients in the step's group
    excluded: bool = False  # attach(opt, parameters=[])
    clipped: Clipped = Clipped.NONE
    group_grew: bool = False  # MIXED: the step's optimizer joined the group after that clip
    closure: bool = False
    compiled_frame: bool = False  # called from code Dynamo compiled (torch.compile(opt.step))
    graph_ready: bool = False  # a clipped step graph of this clip ran for this optimizer
    group_is_step: bool = True  # the group's gradients are exactly this optimizer's
    sparse: bool = False
    dtensor: bool = False
    fuse: bool = True
    computes_norm: bool = True
    trusted: bool = True  # nothing wrote .grad invisibly (collectives, GradScaler.unscale_)
    backward_covers_step: bool = False  # the backward's records cover every gradient of the group
    scaler_stage: str | None = None  # the attached GradScaler's stage for this optimizer
    grad_scale_set: bool = False  # GradScaler.step set opt.grad_scale (a fused optimizer)
    skip_nonfinite: bool = False
    error_if_nonfinite: bool = False
    fused_kernel: bool = False  # the step unscales by opt.grad_scale in its kernel (fused=True)
    float64: bool = False  # fused_kernel, and a gradient is float64 (its grad_scale is float32)
    scale_only: bool = True  # the clip is a scale by the norm's coefficient (no AGC, no clip_value)
    optimizer: str = "the optimizer"  # for messages
    scope: str = ""  # the modules of the group, for messages


class StepPlan(typing.NamedTuple):
    action: Action
    use_backward: bool = False  # take the backward's norms where the records prove them
    hand_norm: bool = False  # IN_GRAPH: compute the group's norm now and hand it to the graph
    unscale: Unscale = Unscale.NONE
    sync_skip: bool = False  # EAGER: read the norm on the host to skip a nonfinite step
    fold: bool = False  # EAGER: the coefficient goes to the fused kernel (opt.grad_scale), no scale pass
    kernel_skip: bool = False  # fold: a nonfinite norm skips the step through opt.found_inf (no sync)
    error: str | None = None


def _error(message: str) -> StepPlan:
    return StepPlan(Action.RAISE, error=f"compileclip: {message}")


@functools.lru_cache(maxsize=1024)
def plan_step(f: StepFacts) -> StepPlan:
    """What to do at one optimizer step (see the module docstring). Pure, and memoized: a
    training loop asks the same question at every step."""
    if f.nested or f.excluded or (f.grads == 0 and not f.closure):
        return StepPlan(Action.NONE)
    if f.clipped is Clipped.ALL and not f.closure:  # skipped with the group when it was
        return StepPlan(Action.ALREADY, sync_skip=f.skip_nonfinite or f.scaler_stage is not None)
    if f.clipped is Clipped.MIXED and f.group_grew:
        return _error(
            f"{f.optimizer}.step() consumes gradients of {f.scope} that an earlier step of the same "
            "backward already clipped, together with gradients of parameters that were not part "
            "of that clip (this optimizer was unknown then). Eager clip_grad_norm_ over the whole "
            "group would have normed them together. Call clip.attach(optimizer) for every "
            "optimizer before the first step, or clip.attach(optimizer, parameters=...) to name "
            "what each step clips")
    if f.sparse:
        return _error(
            f"{f.optimizer} has sparse gradients (nn.Embedding/EmbeddingBag(sparse=True)). Eager "
            "clip_grad_norm_ refuses them too (linalg_vector_norm has no sparse kernel): use "
            "sparse=False, or clip those parameters yourself")
    if f.scaler_stage == "STEPPED":
        return _error(
            "the optimizer already stepped since the last scaler.update(); call scaler.update() "
            "after each step (and do not call scaler.step(opt) as well)")
    unscale = Unscale.NONE
    if f.grad_scale_set:
        unscale = Unscale.GRAD_SCALE
    elif f.scaler_stage == "READY":
        unscale = Unscale.SCALER
    # GRAD_SCALE: the backward's norms are of the scaled gradients (no scaler attached)
    use_backward = f.fuse and f.trusted and not f.dtensor and unscale is not Unscale.GRAD_SCALE
    if f.closure:
        # the closure's backward leaves fresh records: its norms are used where they hold
        return StepPlan(Action.AFTER_CLOSURE, use_backward=use_backward, unscale=unscale,
                        sync_skip=f.skip_nonfinite or unscale is Unscale.SCALER)
    if f.compiled_frame and f.graph_ready and f.fuse and unscale is not Unscale.GRAD_SCALE:
        if f.group_is_step:  # the graph unscales an attached scaler's gradients itself
            return StepPlan(Action.IN_GRAPH, use_backward=use_backward,
                            hand_norm=use_backward and f.backward_covers_step)
        if f.scaler_stage is None and not f.dtensor:
            # the group spans several optimizers: its norm is taken here and handed in, the
            # other optimizers' gradients are scaled here
            return StepPlan(Action.IN_GRAPH, use_backward=use_backward, hand_norm=True)
    # a fused kernel divides by opt.grad_scale: the coefficient costs no pass of its own where
    # the step's optimizer alone consumes the group's gradients (a later step of the group
    # would find them unclipped until the kernel ran) and nothing follows the scale; not for
    # float64 gradients: the kernel's grad_scale is float32, 1e-8 off eager's float64 coefficient
    fold = (f.fuse and f.fused_kernel and f.group_is_step and f.scale_only and f.computes_norm and not f.dtensor
            and not f.float64)
    # ... and skips the update where found_inf is set, so skip_nonfinite needs no host read
    kernel_skip = fold and f.skip_nonfinite and unscale is not Unscale.SCALER
    return StepPlan(Action.EAGER, use_backward=use_backward, unscale=unscale,
                    sync_skip=(f.skip_nonfinite and not kernel_skip) or unscale is Unscale.SCALER, fold=fold,
                    kernel_skip=kernel_skip)
