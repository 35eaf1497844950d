"""Hear every optimizer step: torch's global step pre- and post-hooks, registered once.

The hooks run for every ``opt.step()`` of every ``torch.optim.Optimizer``. Each live clip (held
weakly) says whether the optimizer is its own (``records.resolve_owner``); the owner clips.

Under ``torch.compile`` of a step, Dynamo traces the hooks. Their work is a
``torch._dynamo.disable``d call, so it runs at run time on every step, whichever graph or
fallback Dynamo chooses; whether the calling frame was compiled is passed in as a trace-time
constant (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .records import resolve_owner

_clips: weakref.WeakSet = weakref.WeakSet()  # ClipBackend objects
_handles: list = []


def register(clip) -> None:
    """Make ``clip`` (a ClipBackend) hear every optimizer step while it lives."""
    _clips.add(clip)
    if not _handles:
        _handles.append(register_optimizer_step_pre_hook(_pre_hook))
        _handles.append(register_optimizer_step_post_hook(_post_hook))


def owner_of(opt):
    """The runtime that clips ``opt``'s steps, or None; raises when it is ambiguous."""
    clips = list(_clips)
    strong = [c._runtime for c in clips if c._runtime.knows(opt)]
    graphless = [c._runtime for c in clips if c._runtime.graphless]
    owner, error = resolve_owner(strong, graphless)
    if error is not None:
        raise RuntimeError(f"compileclip: {error}.")
    if owner is not None and not strong:
        owner.warn_once(
            "graphless",
            "this clip has compiled no graph (Dynamo ran the model eagerly: a module it skips "
            "such as nn.LSTM, a graph break in a loop, or its recompile limit), so it cannot "
            f"know its model's parameters. It clips the step of {type(opt).__name__} over that "
            "optimizer's parameters, eagerly (eager clip_grad_norm_ over them gives the same)",
        )
    return owner


@torch._dynamo.disable
def _on_pre(opt, args, kwargs, compiled_frame: bool):
    rt = owner_of(opt)
    if rt is None:
        return None
    return rt.begin_step(opt, args, kwargs, compiled_frame)


@torch._dynamo.disable
def _on_post(opt) -> None:
    for clip in list(_clips):
        rt = clip._runtime
        if rt.open_step is not None and rt.open_step.optimizer() is opt:
            rt.end_step(opt)


def _pre_hook(opt, args, kwargs):
    if not _clips:
        return None
    return _on_pre(opt, args, kwargs, torch.compiler.is_compiling())


def _post_hook(opt, args, kwargs) -> None:
    if _clips:
        _on_post(opt)
