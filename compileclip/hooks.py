"""Hear every optimizer step: torch's global step pre- and post-hooks, registered once.

The hooks run for every ``opt.step()`` of every ``torch.optim.Optimizer``. Each live clip (held
weakly) says whether the optimizer is its own (``records.resolve_owner``); the owner clips.

Under ``torch.compile`` of a step, Dynamo traces the hooks. Their work is a
``torch._dynamo.disable``d call, so it runs at run time on every step, whichever graph or
fallback Dynamo chooses; whether the calling frame was compiled is passed in as a trace-time
constant (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .records import resolve_owner

_clips: weakref.WeakSet = weakref.WeakSet()  # ClipBackend objects
_handles: list = []
# ownership is decided once per optimizer and kept until any clip learns something new
# (parameters, graphs, steps: ``changed()``) or a clip is made
_epoch = 0
_owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # opt -> (epoch, runtime ref, graphless)


def changed() -> None:
    """What some clip knows changed: decide the owners of optimizers again."""
    global _epoch
    _epoch += 1


def register(clip) -> None:
    """Make ``clip`` (a ClipBackend) hear every optimizer step while it lives."""
    _clips.add(clip)
    changed()
    if not _handles:
        _handles.append(register_optimizer_step_pre_hook(_pre_hook))
        _handles.append(register_optimizer_step_post_hook(_post_hook))


def _decide(opt):
    clips = list(_clips)
    strong = [c._runtime for c in clips if c._runtime.knows(opt)]
    graphless = [c._runtime for c in clips if c._runtime.graphless]
    return resolve_owner(strong, graphless), not strong


def owner_of(opt):
    """(the runtime that clips ``opt``'s steps or None, whether it owns it only for having
    compiled nothing); raises when it is ambiguous. Cached per optimizer until something changes."""
    cached = _owners.get(opt)
    if cached is not None and cached[0] == _epoch:
        rt = cached[1]() if cached[1] is not None else None
        if rt is not None or cached[1] is None:
            return rt, cached[2]
    (owner, error), weak = _decide(opt)
    if weak and (owner is not None or error is not None):
        # a clip that compiled nothing may be a dead one that only a reference cycle keeps:
        # collect those before letting a graphless clip take an optimizer
        gc.collect()
        (owner, error), weak = _decide(opt)
    if error is not None:
        raise RuntimeError(f"compileclip: {error}.")
    _owners[opt] = (_epoch, weakref.ref(owner) if owner is not None else None, weak)
    return owner, weak


@torch._dynamo.disable
def _on_pre(opt, args, kwargs, compiled_frame: bool):
    rt, graphless = owner_of(opt)
    if rt is None:
        return None
    if graphless:  # from now on this clip knows the optimizer, and is no longer graphless
        rt.bind(opt)
    out = rt.begin_step(opt, args, kwargs, compiled_frame)
    rt.open_step.graphless_owner = graphless
    return out


@torch._dynamo.disable
def _on_post(opt) -> None:
    for clip in list(_clips):
        rt = clip._runtime
        rec = rt.open_step
        if rec is not None and rec.optimizer() is opt:
            rt.end_step(opt)
            if rec.graphless_owner and rt.graphs == 0:  # the step did not compile a graph either
                rt.warn_once(
                    "graphless",
                    "this clip has compiled no graph (Dynamo ran the model eagerly: a module it "
                    "skips such as nn.LSTM, a graph break in a loop, or its recompile limit), so "
                    "it cannot know its model's parameters. It clipped the step of "
                    f"{type(opt).__name__} over that optimizer's parameters, eagerly (eager "
                    "clip_grad_norm_ over them gives the same)",
                )


def _pre_hook(opt, args, kwargs):
    if not _clips:
        return None
    return _on_pre(opt, args, kwargs, torch.compiler.is_compiling())


def _post_hook(opt, args, kwargs) -> None:
    if _clips:
        _on_post(opt)
