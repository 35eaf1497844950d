"""Carrying out a step plan outside a graph: the eager clip of a group, as ``clip_grad_norm_``.

``carry_out`` does what the plan says at the pre-hook. The eager clip (``clip_group``) is
eager's own arithmetic (``clipmath``) over the group's gradients: their norms from the backward
graphs where the records prove them (``records.ordered_norms``) and computed here for the rest,
stacked in the order eager's ``get_total_norm`` stacks them, so that the total norm, the
coefficient and the clipped gradients are eager's bits. DTensor gradients: their local shards'
norms and one all-reduce (``shards.py``), else torch's own ``get_total_norm``.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import TYPE_CHECKING

import torch

from . import clipmath, identity, records, shards
from .plan import Action, Clipped, Unscale

if TYPE_CHECKING:
    from .runtime import ClipRuntime, OpenStep


_DTENSOR: list = []  # the class, looked up once (an import statement costs a microsecond a call)


def is_dtensor(t) -> bool:
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a build without distributed
            DTensor = ()
        _DTENSOR.append(DTensor)
    return isinstance(t, _DTENSOR[0])


_SCALER_FRAMES = 12  # facts <- begin_step <- hooks (3) <- Optimizer.step's wrappers (1-3) <- GradScaler
SCALER_FRAMES_ABOVE = _SCALER_FRAMES - 4  # the same, from above CompiledStep.__call__ <- begin <- ...


def called_from_grad_scaler(frame=None, frames: int = _SCALER_FRAMES) -> bool:
    """Whether this step was called by ``GradScaler.step``, which unscaled the gradients in
    place without moving their version counters. A bounded look at the callers' code objects
    (no frame locals): torch gives no other sign of it. ``frame``: where to start (default:
    the caller); a caller that starts higher (``CompiledStep``) looks at fewer frames of its
    own, which are new at every step and cost an allocation each to look at."""
    codes = _CODES[0] if _CODES else _scaler_codes()
    f = sys._getframe(1) if frame is None else frame
    for _ in range(frames):
        if f is None:
            return False
        if f.f_code in codes:
            return True
        f = f.f_back
    return False


_CODES: list[frozenset] = []


def _scaler_codes() -> frozenset:
    if not _CODES:
        from torch.amp import GradScaler

        _CODES.append(frozenset(fn.__code__ for fn in (GradScaler.step, GradScaler._maybe_opt_step)))
    return _CODES[0]


def trusted(rt: ClipRuntime, scaler_called: bool | None = None) -> bool:
    """``GradScaler.unscale_``'s kernel did not write the gradients behind the records' back (it
    moves no version counter, measured on torch 2.13; nor do c10d collectives, which
    ``ClipRuntime.usable_runs`` answers for). With a scaler attached, the backward's norms are
    of the unscaled gradients already. ``scaler_called``: known by the caller (None: look)."""
    if rt.scaler is not None:
        return True
    return not (called_from_grad_scaler() if scaler_called is None else scaler_called)


def fused_kernel(opt) -> bool:
    """``opt.step`` divides the gradients by ``opt.grad_scale`` in its kernel and writes them
    back: torch's optimizers with ``fused=True`` (GradScaler reads the same flag)."""
    return (getattr(opt, "_step_supports_amp_scaling", False) and type(opt).__module__.startswith("torch.optim")
            and all(g.get("fused") for g in opt.param_groups))


def carry_out(rt: ClipRuntime, step: OpenStep, opt, args: tuple, kwargs: dict):
    """Do at the pre-hook what ``step.plan`` says. Returns new (args, kwargs) for a closure."""
    action = step.plan.action
    if action is Action.EAGER:
        clip_group(rt, step, opt)
    elif action is Action.IN_GRAPH and step.plan.hand_norm:
        hand_norm(rt, step, opt)
    elif action is Action.ALREADY and step.plan.sync_skip:
        if rt.scaler is not None:  # the step stands in for scaler.step(opt)
            step.scaler_state = rt.scaler._per_optimizer_states[id(opt)]
        if bool(rt.marks[id(step.group.key)].skipped):
            _hide(step, identity.step_params(opt))
    elif action is Action.AFTER_CLOSURE:
        return _wrap_closure(rt, step, opt, args, kwargs)
    return None


def _wrap_closure(rt, step, opt, args, kwargs):
    closure = args[1] if len(args) > 1 else kwargs["closure"]

    @torch._dynamo.disable  # a compiled step traces its closure: the clip stays eager
    def clip_now():
        step.params = step.grads = step.sources = None  # the closure's backward made new gradients
        marks = rt.marks.get(id(step.group.key))
        if rt.clipped_state(opt, identity.step_params(opt), marks)[0] is Clipped.ALL:
            # it made none (Lightning's manual optimization: a no-op closure, the backward before
            # the step): the group's gradients are those an earlier step of this backward clipped
            marks.consumers.add(id(opt))
            return
        clip_group(rt, step, opt)

    def clipped_closure():
        with torch.enable_grad():
            loss = closure()
        clip_now()
        return loss

    if len(args) > 1:
        return (args[0], clipped_closure, *args[2:]), kwargs
    return args, {**kwargs, "closure": clipped_closure}


def _hide(step: OpenStep, params) -> None:
    """A skipped step: an optimizer skips parameters without a gradient, so hide them for this
    step (``end_step`` gives them back); ``.grad`` holds what eager's clip leaves."""
    step.hidden = [(p, p.grad) for p in params]
    for p in params:
        p.grad = None


def _unscale(rt: ClipRuntime, step: OpenStep, opt, params) -> bool:
    """The plan's GradScaler action; returns whether the step overflowed (a host read, as
    ``scaler.step``'s)."""
    if step.plan.unscale is Unscale.SCALER:
        # the step stands in for scaler.step(opt), as in eager's recipe: unscale_ (which records
        # found_inf for scaler.update()) the group's optimizers, clip, skip on overflow, STEPPED
        from torch.amp.grad_scaler import OptState

        overflow = False
        for o in step.group.optimizers:
            state = rt.scaler._per_optimizer_states[id(o)]
            if state["stage"] is OptState.READY:
                rt.scaler.unscale_(o)
            overflow = overflow or bool(sum(float(v) for v in state["found_inf_per_device"].values()))
        step.scaler_state = rt.scaler._per_optimizer_states[id(opt)]
        return overflow
    if step.plan.unscale is Unscale.GRAD_SCALE:
        # GradScaler.step set grad_scale for a fused kernel to divide by: unscale as unscale_
        # does, so that the clip sees eager's gradients, and let the kernel divide by nothing
        inv = clipmath.inverse_scale(opt.grad_scale)
        found = torch.zeros(1, device=inv.device)
        torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], found, inv.reshape(1))
        opt.grad_scale = None
    return False


def group_norms(rt: ClipRuntime, params: list, use_backward: bool, step: OpenStep | None = None) -> torch.Tensor:
    """The norm of each of ``params``' gradients, in their order (see ``records``)."""
    found = step.sources if step is not None and step.params is params else None
    runs = found.runs if found is not None else rt.usable_runs()
    parts, from_backward = records.ordered_norms(runs, params, rt.config.norm_type, trusted=use_backward, found=found)
    rt.stats["norm_from_backward" if from_backward == len(params) else "norm_at_step"] += 1
    if step is not None:
        step.backward_norms = from_backward == len(params)
    if use_backward and runs and from_backward == 0:
        _warn_if_changed_in_place(rt, runs, params)
    return parts


def _warn_if_changed_in_place(rt: ClipRuntime, runs: list, params: list) -> None:
    ids = {id(p) for p in params}
    changed = [c for run in runs for r, c in zip(run.params, run.changed_in_place()) if id(r()) in ids]
    if changed and all(changed):
        rt.warn_once(
            "changed_in_place",
            "the gradients were changed in place between backward() and the optimizer step (by "
            "another gradient clip, such as torch.nn.utils.clip_grad_norm_, the HF Trainer's "
            "max_grad_norm or Lightning's gradient_clip_val, or by code of your own). compileclip "
            "clips at the step, over the gradients as they are then: clip.total_norm is their "
            "norm after that change, and with two clips the smaller max_norm wins. If it is "
            "another clip, turn it off (max_grad_norm=0, gradient_clip_val=None, or remove the call)")


def total_of(parts: torch.Tensor, grads: list, norm_type: float, uniform: bool = False) -> torch.Tensor:
    """The total norm, the parts stacked in eager ``get_total_norm``'s order (``uniform``: the
    gradients are known to share one device and dtype)."""
    order = None if uniform else clipmath.eager_order(grads)
    return clipmath.total(parts if order is None else parts[torch.tensor(order, device=parts.device)], norm_type)


def step_total(step: OpenStep, parts: torch.Tensor, grads: list, norm_type: float) -> torch.Tensor:
    """The total norm of ``step``'s gradients from their norms ``parts`` (stacked in eager's
    order unless one backward run's single piece gave them all)."""
    uniform = _uniform(step)
    return total_of(parts, None if uniform else grads, norm_type, uniform=uniform)


def _uniform(step: OpenStep) -> bool:
    """Every norm came from one backward run's single piece: one device and dtype, so the
    norms are stacked in the gradients' order, as eager's."""
    return step.backward_norms and step.sources is not None and step.sources.uniform


def clip_group(rt: ClipRuntime, step: OpenStep, opt) -> None:
    """The eager clip of ``step``'s group: ``clip_grad_norm_`` then ``clip_grad_value_``."""
    cfg = rt.config
    if step.params is not None:
        params, grads = step.params, step.grads
    else:
        params, grads = identity.with_grads(step.group.params)
    if not params:
        return
    skip = _unscale(rt, step, opt, params)  # in place: the same gradient tensors
    mon = rt.monitor(step.group)
    local = shards.placements_of(grads) if is_dtensor(grads[0]) else None
    dims = shards.reduce_dims(local[1]) if local is not None else None
    if is_dtensor(grads[0]) and dims is None:
        _clip_dtensors(rt, params, mon)  # torch's own DTensor path (see shards)
    elif cfg.computes_norm:
        if dims is not None:  # DTensors: the local shards, one all-reduce
            total = shards.total_norm(grads, cfg.norm_type, local[0], dims)
            if mon.per_param:
                mon.record_param_norms(_dtensor_norms(grads, cfg.norm_type), [weakref.ref(p) for p in params])
            grads = shards.local_grads(grads)
            rt.stats["norm_local_shards"] += 1
        else:
            parts = group_norms(rt, params, step.plan.use_backward, step)
            total = step_total(step, parts, grads, cfg.norm_type)
            if mon.per_param:
                mon.record_param_norms(parts, [weakref.ref(p) for p in params])
        if cfg.error_if_nonfinite and not bool(torch.isfinite(total)):
            rt.total_norm = total
            raise RuntimeError(
                f"The total norm of order {cfg.norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        if step.plan.kernel_skip:
            kernel_skip(rt, step, opt, total, params)
        else:
            skip = skip or (cfg.skip_nonfinite and not bool(torch.isfinite(total)))
        thr = threshold_for(rt, total, mon)
        if mon.agc is not None:
            clipmath.agc_(params, mon.agc.clipping, mon.agc.eps)
        elif cfg.max_norm is not None:
            coef = clipmath.coefficient(total, _eager_max_norm(cfg, thr))
            if step.plan.fold and not skip:
                fold(rt, step, opt, coef)
            else:
                clipmath.scale_(grads, coef)
        rt.finish(total, thr, mon)
    if cfg.clip_value is not None:
        clipmath.clamp_values_([p.grad for p in params], cfg.clip_value)
    if skip:
        rt.count_skipped(torch.ones((), device=grads[0].device))
        step.skipped = True
        _hide(step, params)
    step.clipped = True
    rt.consume_runs(step.group.members or {id(p) for p in params})


_ABSENT = object()


def fold(rt: ClipRuntime, step: OpenStep, opt, coef: torch.Tensor) -> None:
    """The clip coefficient into a fused optimizer's kernel: torch's fused Adam, AdamW, SGD and
    Adagrad divide every gradient by ``opt.grad_scale`` (GradScaler's protocol) and write the
    quotient back to ``.grad``, so ``grad / (1 / coef)`` costs no pass of its own. Not eager's
    bits: a division by the rounded reciprocal against eager's multiplication (within an ulp or
    so of each gradient; the tests compare at assert_close's float32 tolerance). A scale that is
    already there (GradScaler's, a user's) is multiplied, as GradScaler does. ``unfold`` puts
    back what was there after the step."""
    inv = coef.to(torch.float32).reciprocal()
    before = _set(step, opt, "grad_scale")
    opt.grad_scale = inv if before is _ABSENT or before is None else before * inv
    rt.stats["scale_folded"] += 1


def kernel_skip(rt: ClipRuntime, step: OpenStep, opt, total: torch.Tensor, params: list) -> None:
    """``skip_nonfinite`` for a folded step: the nonfinite flag as ``opt.found_inf`` (added to
    GradScaler's), on which the fused kernel leaves parameters, state and ``.grad`` as they were
    (the step count too); no host read. On an optimizer's first step torch creates its state
    before the kernel skips: ``unfold`` drops it again (one host read, that step only), as eager,
    which never stepped, has none. ``.grad`` of a skipped step keeps the unclipped gradients
    (nothing consumed them)."""
    flag = clipmath.nonfinite(total)
    before = _set(step, opt, "found_inf")
    opt.found_inf = flag if before is _ABSENT or before is None else before + flag.to(before.device)
    rt.count_skipped(flag)
    step.skipped = flag
    if any(p not in opt.state for p in params):
        step.state_before = {p: set(st) for p, st in opt.state.items()}


def _set(step: OpenStep, opt, name: str):
    before = opt.__dict__.get(name, _ABSENT)
    step.attrs_before.setdefault(name, before)
    return before


def unfold(rt: ClipRuntime, step: OpenStep, opt) -> None:
    """After a folded step: the optimizer's ``grad_scale``/``found_inf`` as they were; the
    state a skipped first step created, dropped at the next step."""
    attrs, step.attrs_before = step.attrs_before, {}
    for name, before in attrs.items():
        if before is _ABSENT:
            opt.__dict__.pop(name, None)
        else:
            setattr(opt, name, before)
    state, step.state_before = step.state_before, None
    if state is not None and bool(step.skipped):
        rt.state_drops.append((weakref.ref(opt), state))


def run_state_drops(rt: ClipRuntime) -> None:
    """Drop the optimizer state that skipped first steps created (``unfold``, ``graph_done``),
    as eager, which never stepped, has none."""
    drops, rt.state_drops = rt.state_drops, []
    for ref, before in drops:
        opt = ref()
        for p in list(opt.state) if opt is not None else ():
            keep = before.get(p)
            if not keep:
                del opt.state[p]
            else:
                for key in [k for k in opt.state[p] if k not in keep]:
                    del opt.state[p][key]


def _dtensor_norms(grads: list, norm_type: float) -> torch.Tensor:
    """Each DTensor gradient's own norm, replicated (a monitor's per-parameter norms)."""
    norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in grads]
    return torch.stack([n.full_tensor() if is_dtensor(n) else n for n in norms])


def _eager_max_norm(cfg, thr: torch.Tensor):
    """A number ``max_norm`` as eager passes it (a Python float); a threshold tensor otherwise."""
    return cfg.max_norm if isinstance(cfg.max_norm, float) else thr


def threshold_for(rt: ClipRuntime, total: torch.Tensor, mon) -> torch.Tensor:
    """This step's threshold (0-d float32 on ``total``'s device): the policy's (with ``mon``'s
    statistics), a fixed ``max_norm``, nan for AGC (no global threshold)."""
    if mon.policy is not None:
        return mon.policy_threshold(total)
    if mon.agc is not None:
        return rt.const("nan", math.nan, torch.float32, total.device)
    return rt.max_norm_on(total.device)


def hand_norm(rt: ClipRuntime, step: OpenStep, opt) -> None:
    """IN_GRAPH over part of a group: the group's norm now, handed to the step graph; the
    group's gradients that the graph does not see are clipped here."""
    cfg = rt.config
    params = step.params
    mon = rt.monitor(step.group)
    parts = group_norms(rt, params, step.plan.use_backward, step)
    total = step.handed = step_total(step, parts, step.grads, cfg.norm_type)
    if mon.per_param:
        mon.record_param_norms(parts, [weakref.ref(p) for p in params])
    if step.group.is_exactly(opt):
        return rt.consume_runs(step.group.members)  # the graph sees every gradient of the group
    own = identity.ids(identity.step_params(opt))
    others = [p for p in params if id(p) not in own]
    if others:
        thr = threshold_for(rt, total, mon)
        if mon.agc is not None:
            clipmath.agc_(others, mon.agc.clipping, mon.agc.eps)
        elif cfg.max_norm is not None:
            clipmath.scale_([p.grad for p in others], clipmath.coefficient(total, _eager_max_norm(cfg, thr)))
        if cfg.clip_value is not None:
            clipmath.clamp_values_([p.grad for p in others], cfg.clip_value)
    rt.consume_runs(step.group.members or {id(p) for p in params})


def _clip_dtensors(rt: ClipRuntime, params: list, mon) -> None:
    """Eager ``clip_grad_norm_`` over DTensor gradients with torch's own two halves (the norm
    is a DTensor whose reduction across ranks DTensor performs)."""
    cfg = rt.config
    if not cfg.computes_norm:
        return
    grads = [p.grad for p in params]
    if mon.per_param:  # before the clip scales them
        mon.record_param_norms(_dtensor_norms(grads, cfg.norm_type), [weakref.ref(p) for p in params])
    total = torch.nn.utils.get_total_norm(grads, cfg.norm_type, cfg.error_if_nonfinite, None)
    total = total.full_tensor() if is_dtensor(total) else total
    thr = threshold_for(rt, total, mon)
    if cfg.max_norm is not None and mon.agc is None:
        torch.nn.utils.clip_grads_with_norm_(params, _eager_max_norm(cfg, thr), total, None)
    if mon.agc is not None:
        clipmath.agc_(params, mon.agc.clipping, mon.agc.eps)
    rt.finish(total, thr, mon)
    rt.stats["norm_at_step"] += 1
