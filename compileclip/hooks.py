"""Hear every optimizer step: torch's global step pre- and post-hooks, registered while a clip
lives.

The hooks run for every ``opt.step()`` of every ``torch.optim.Optimizer``. The clip whose scope
claims the optimizer (``scope.Scope.claims``: attached, compiled step, or holding a leaf of a
graph it compiled) owns the step and carries out its plan. Two clips claiming one optimizer
would clip the same gradients twice: refused. An optimizer no clip claims is left alone, unless
a clip has run a backward whose gradients no step consumed yet: then eager code would have
clipped this step and the clip cannot know over what, so the step raises (``clip.attach``
tells it). A clip that compiled nothing (Dynamo ran its model eagerly) finds its modules once
(``discover.py``).

Under ``torch.compile`` of a step, Dynamo traces the hooks. Their work is a
``torch._dynamo.disable``d call, so it runs at run time on every step, whichever graph or
fallback Dynamo chooses; whether the calling frame was compiled is passed in as a trace-time
constant (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import weakref

import torch
from torch.optim import optimizer as _optim
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import discover, scope

_clips: weakref.WeakSet = weakref.WeakSet()  # ClipBackend objects
_handles: list = []
# the owner of each optimizer, decided once and kept until some clip's scope changes
_owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # opt -> (versions, runtime ref)
_steps = [0]  # optimizer steps begun in this process (of any optimizer), while a clip lives


def steps() -> int:
    return _steps[0]


def register(clip) -> None:
    """Make ``clip`` (a ClipBackend) hear every optimizer step until ``remove(clip)``."""
    _clips.add(clip)
    scope.bump()
    if not _handles:
        _handles.append(register_optimizer_step_pre_hook(_pre_hook))
        _handles.append(register_optimizer_step_post_hook(_post_hook))


def remove(clip) -> None:
    """``clip`` hears no more steps; torch's hooks go when no clip is left."""
    _clips.discard(clip)
    _owners.clear()
    scope.bump()
    if not _clips:
        while _handles:
            _handles.pop().remove()


def registered(clip) -> bool:
    return clip in _clips


def owner_of(opt):
    """The runtime that clips ``opt``'s steps, or None. Raises where the clip cannot know what
    eager code would do (two clips, or an unknown optimizer after a backward of a clip)."""
    # the clips, their scopes and failures (scope.epoch), and an unknown optimizer that may
    # have added the leaves of a scope since
    versions = (scope.epoch(), scope.layout(opt))
    cached = _owners.get(opt)
    if cached is not None and cached[0] == versions:
        owner = cached[1]() if cached[1] is not None else None
        if cached[1] is None or owner is not None:
            if owner is None:
                _pending_error(list(_clips), opt)
            return owner
    clips = list(_clips)
    claiming = [c for c in clips if c._runtime.scope.claims(opt)]
    if not claiming and discover.find_modules(clips, opt):
        claiming = [c for c in clips if c._runtime.scope.claims(opt)]
        versions = (scope.epoch(), scope.layout(opt))
    if len(claiming) > 1:
        raise RuntimeError(
            f"compileclip: {len(claiming)} clip backends cover the parameters of this "
            f"{type(opt).__name__} (one compiled the model, another the step?). Each would clip the "
            "same gradients: use one clip object for the model and the step.")
    owner = claiming[0]._runtime if claiming else None
    _owners[opt] = (versions, weakref.ref(owner) if owner is not None else None)
    if owner is None:
        _pending_error(clips, opt)
    return owner


def _pending_error(clips, opt) -> None:
    """Raise if a clip ran a backward since the last optimizer step (of any optimizer), whose
    gradients are still ``.grad`` and no optimizer of the clip will consume, while ``opt``,
    which no clip knows, steps: eager code would have clipped before this step (``opt`` holds
    fp32 master copies?), and the clip cannot tell over what."""
    for c in clips:
        rt = c._runtime
        pending = rt.pending()
        if not pending or rt.consumed_by_known(pending):
            continue
        discover.find_optimizers(rt)  # the first iteration: its own optimizer has not stepped yet
        if rt.consumed_by_known(pending):
            continue
        raise RuntimeError(
            f"compileclip: {type(opt).__name__}.step() updates parameters that this clip does not "
            f"know, after a backward of {rt.scope.describe()} (compiled with it) whose gradients no "
            "optimizer will consume. Eager code would clip right before this step, and the clip "
            "cannot tell over which parameters (fp32 master copies of the model's parameters?). "
            "Tell it before the first step: clip.attach(optimizer) clips this optimizer's "
            "parameters, as clip_grad_norm_(optimizer's parameters) before its step; "
            "clip.attach(optimizer, parameters=[...]) clips the parameters you name; "
            "clip.attach(optimizer, parameters=[]) leaves its steps unclipped.")


def unconsumed_error(rt, opt, group) -> None:
    """Raise if a backward of ``rt``'s clip produced gradients (since the last optimizer step)
    outside ``group``, the group of ``opt``'s step, that no optimizer the clip knows or can
    find consumes: eager code would clip right before this step, over those too or not, and the
    clip cannot tell which. ``clip.attach(opt)`` names the group (the optimizer's parameters)."""
    left = rt.pending() - group.members
    if not left or rt.consumed_by_known(left):
        return
    discover.find_optimizers(rt)
    if rt.consumed_by_known(left):
        return
    raise RuntimeError(
        f"compileclip: {type(opt).__name__}.step() clips the gradients of its group, but a backward of "
        f"{rt.scope.describe()} (compiled with this clip) also produced gradients of {len(left)} "
        "parameters that no optimizer consumes. Eager code would call clip_grad_norm_ right before "
        "this step, with or without them, and the clip cannot tell which. Say it before the first "
        "step: clip.attach(optimizer) clips this optimizer's parameters only, as "
        "clip_grad_norm_(optimizer's parameters); or freeze the others (requires_grad_(False)), or "
        "give them to an optimizer.")


def begin(opt, args, kwargs, compiled_frame: bool, again: bool = False, scaler_called: bool | None = None):
    """The clips' side of a step's pre-hook. Returns new (args, kwargs) when the step's closure
    is wrapped."""
    return begin_owned(opt, args, kwargs, compiled_frame, again, scaler_called)[1]


def begin_owned(opt, args, kwargs, compiled_frame: bool, again: bool = False, scaler_called: bool | None = None):
    """``begin``, for a caller that runs the hooks itself (``CompiledStep``; ``again``: the
    same step, planned anew after an abort; ``scaler_called``: see ``eager.trusted``).
    Returns (the owner's runtime or None, new (args, kwargs) or None)."""
    if not _clips:
        return None, None
    _steps[0] += not again
    rt = owner_of(opt)
    if rt is None:
        return None, None
    return rt, rt.begin_step(opt, args, kwargs, compiled_frame, scaler_called)


def end(opt, owner=None) -> None:
    """The clips' side of a step's post-hook. ``owner``: the runtime ``begin_owned`` returned;
    when its clip is the only one, no other can have a step open (a few us a step)."""
    runtimes = (owner,) if owner is not None and len(_clips) == 1 else [c._runtime for c in list(_clips)]
    for rt in runtimes:
        if rt.open is not None and (rt.nested or rt.open.optimizer() is opt):
            rt.end_step(opt)
            discover.warn_if_graphless(rt, opt)


def others(opt) -> tuple[list, list]:
    """The step pre- and post-hooks torch's ``Optimizer.step`` wrapper would run, in its order,
    but this module's: for a step that runs them itself (``CompiledStep``)."""
    glob_pre, glob_post = _optim._global_optimizer_pre_hooks, _optim._global_optimizer_post_hooks
    own_pre, own_post = opt._optimizer_step_pre_hooks, opt._optimizer_step_post_hooks
    if len(glob_pre) + len(glob_post) + len(own_pre) + len(own_post) == len(_handles):
        return (), ()  # only this module's
    pre = [h for h in glob_pre.values() if h is not _pre_hook]
    post = [h for h in glob_post.values() if h is not _post_hook]
    return pre + list(own_pre.values()), list(own_post.values()) + post


_on_pre = torch._dynamo.disable(begin)
_on_post = torch._dynamo.disable(end)


# Dynamo traces these two: they read no mutable state (a guard on the set of clips would
# recompile the step whenever a clip is collected); the disabled calls do the work
def _pre_hook(opt, args, kwargs):
    return _on_pre(opt, args, kwargs, torch.compiler.is_compiling())


def _post_hook(opt, args, kwargs) -> None:
    _on_post(opt)
