"""Hear every optimizer step: torch's global step pre- and post-hooks, registered once.

The hooks run for every ``opt.step()`` of every ``torch.optim.Optimizer``. Each live clip (held
weakly) says whether the optimizer is its own (``records.resolve_owner``): it compiled that
optimizer's step, or a graph or module holding one of its parameters. A clip that compiled
nothing (Dynamo ran its model eagerly) first finds its modules through the ``torch.compile``
wrappers that hold it (``_discover``). The owner clips; an optimizer no clip knows is left alone.

Under ``torch.compile`` of a step, Dynamo traces the hooks. Their work is a
``torch._dynamo.disable``d call, so it runs at run time on every step, whichever graph or
fallback Dynamo chooses; whether the calling frame was compiled is passed in as a trace-time
constant (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .records import resolve_owner

_clips: weakref.WeakSet = weakref.WeakSet()  # ClipBackend objects
_handles: list = []
# ownership is decided once per optimizer and kept until any clip learns something new
# (parameters, graphs, steps: ``changed()``) or a clip is made
_epoch = 0
_owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # opt -> (epoch, runtime ref)


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


_BACKEND_LINKS = ("dynamo_ctx", "callback", "_torchdynamo_orig_backend", "_inner_convert", "compiler_fn")


def _backend_of(obj, clips: dict, depth: int = 8):
    """The ClipBackend (among ``clips``, by id) behind a ``torch.compile`` wrapper (an
    OptimizedModule's context, or the function ``Module.compile`` installs), following
    Dynamo's wrappers, or None. By identity: some wrappers are not hashable."""
    for _ in range(depth):
        if id(obj) in clips:
            return clips[id(obj)]
        nxt = next((getattr(obj, a) for a in _BACKEND_LINKS if getattr(obj, a, None) is not None), None)
        if nxt is None and callable(obj) and getattr(obj, "__closure__", None):
            # Module.compile's function closes over the Dynamo context
            nxt = next((c.cell_contents for c in obj.__closure__
                        if hasattr(c.cell_contents, "callback")), None)
        if nxt is None:
            return None
        obj = nxt
    return None


def _discover(runtimes) -> None:
    """Clips that compiled nothing (Dynamo ran their model eagerly: a module it skips, its
    recompile limit) learn their modules from the ``torch.compile`` wrappers that hold them:
    ``torch.compile(model, backend=clip)`` and ``model.compile(backend=clip)``."""
    wanted = {id(rt) for rt in runtimes}
    clips = {id(c): c for c in list(_clips)}
    with warnings.catch_warnings():  # touching every object wakes deprecated ones
        warnings.simplefilter("ignore")
        _scan(wanted, clips)


def _scan(wanted: set, clips: dict) -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    for obj in gc.get_objects():
        try:
            if isinstance(obj, OptimizedModule):
                mod, link = obj._orig_mod, obj.dynamo_ctx
            elif isinstance(obj, torch.nn.Module) and getattr(obj, "_compiled_call_impl", None) is not None:
                mod, link = obj, obj._compiled_call_impl
            else:
                continue
            clip = _backend_of(link, clips)
        except ReferenceError:  # a weak proxy whose object is gone
            continue
        if clip is not None and id(clip._runtime) in wanted:
            clip._runtime.add_modules([mod])


def _decide(opt):
    clips = list(_clips)
    strong = [c._runtime for c in clips if c._runtime.knows(opt)]
    graphless = [c._runtime for c in clips if c._runtime.graphless]
    if not strong and graphless:
        _discover(graphless)
        strong = [c._runtime for c in clips if c._runtime.knows(opt)]
    return resolve_owner(strong)


def owner_of(opt):
    """The runtime that clips ``opt``'s steps, or None; raises when it is ambiguous. Cached
    per optimizer until what some clip knows changes."""
    cached = _owners.get(opt)
    if cached is not None and cached[0] == _epoch:
        rt = cached[1]() if cached[1] is not None else None
        if rt is not None or cached[1] is None:
            return rt
    owner, error = _decide(opt)
    if error is not None:
        raise RuntimeError(f"compileclip: {error}.")
    _owners[opt] = (_epoch, weakref.ref(owner) if owner is not None else None)
    return owner


@torch._dynamo.disable
def _on_pre(opt, args, kwargs, compiled_frame: bool):
    if not _clips:
        return None
    rt = owner_of(opt)
    if rt is None:
        return None
    out = rt.begin_step(opt, args, kwargs, compiled_frame)
    # it knows the optimizer only from modules Dynamo ran eagerly (found by _discover)
    rt.open_step.graphless_owner = rt.graphs == 0 and len(rt.modules) > 0
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
                    "this clip has compiled no graph (Dynamo ran its model eagerly: a module it "
                    "skips such as nn.LSTM, or its recompile limit). It clipped the step of "
                    f"{type(opt).__name__} eagerly instead, over that optimizer's parameters "
                    "(the same result as eager clip_grad_norm_, without the fusion)",
                )


# Dynamo traces these two: they read no mutable state (a guard on the set of clips would
# recompile the step whenever a clip is collected); the disabled calls do the work
def _pre_hook(opt, args, kwargs):
    return _on_pre(opt, args, kwargs, torch.compiler.is_compiling())


def _post_hook(opt, args, kwargs) -> None:
    _on_post(opt)
