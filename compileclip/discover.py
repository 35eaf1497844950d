"""A fallback for clips that compiled nothing: Dynamo ran their model eagerly (a module it skips,
such as ``nn.LSTM`` up to torch 2.14, or its recompile limit in a sweep), so the backend never
ran and the clip knows no leaf. The modules it was given to are found through the
``torch.compile`` wrappers that hold it (``torch.compile(model, backend=clip)``,
``model.compile(backend=clip)``): a scan of the objects the garbage collector tracks.

The same scan finds the optimizers of a clip that no step has shown it yet (``find_optimizers``):
when an optimizer it does not know steps right after one of its backwards, and before a group's
clip when some of its leaves are held by none of its known optimizers (``complete_group``).

Bounded: a scan runs only when an optimizer that no clip claims steps while a clip that has
compiled nothing lives (at most once per such optimizer and set of those clips), when a clip
cannot tell its groups' optimizers or the model around a group of several units (at most once
per change of its scope: its first steps, and after a recompile), or when a graph runs for a
module of the same class it has not seen (``modules_holding``: once for all). Measured in ``bench/scope_overhead.py``. Nothing else on the step path looks
at the heap.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import torch

_scanned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # opt -> ids of the clips scanned for
_searched: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # runtime -> scope version searched at
_completed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # runtime -> {id(group key): version checked}
_modules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # runtime -> its compiled modules, last scan
_LINKS = ("dynamo_ctx", "callback", "_torchdynamo_orig_backend", "_inner_convert", "compiler_fn")


def _graphless(clips) -> list:
    return [c for c in clips if not c._runtime.failed and c._runtime.graphs == 0 and not c._runtime.scope.units]


def find_modules(clips, opt) -> bool:
    """Let each clip that compiled nothing learn the modules it was given to; True if one did."""
    waiting = _graphless(clips)
    key = frozenset(id(c) for c in waiting)
    if not waiting or _scanned.get(opt) == key:
        return False
    _scanned[opt] = key
    by_id = {id(c): c for c in waiting}
    found = False
    with warnings.catch_warnings():  # touching every object wakes deprecated ones
        warnings.simplefilter("ignore")
        for mod, clip in _wrapped_modules(by_id):
            clip._runtime.scope.add_graph([mod], [])
            found = True
    return found


def modules_holding(rt, leaves) -> list[torch.nn.Module]:
    """The modules compiled with ``rt``'s clip that hold any of ``leaves`` (``instances.py``:
    a graph runs with another module's parameters). From the modules of the last scan, else a
    scan (once per module: regional compilation's blocks are all found by the first)."""
    from . import hooks

    ids = {id(t) for t in leaves}
    cached = _modules.get(rt)
    for scan in (False, True):
        if scan:
            clips = {id(c): c for c in list(hooks._clips) if c._runtime is rt}
            with warnings.catch_warnings():  # touching every object wakes deprecated ones
                warnings.simplefilter("ignore")
                cached = [weakref.ref(m) for m, _ in _wrapped_modules(clips)] if clips else []
            _modules[rt] = cached
        found = [m for m in (r() for r in cached or ()) if m is not None and any(id(p) in ids for p in m.parameters())]
        if found:
            return found
    return []


def enclosing_module(params) -> torch.nn.Module | None:
    """The module with the fewest parameters that holds all of ``params`` (the model around
    regionally compiled blocks), from a scan of the heap; None if no module does."""
    from torch._dynamo.eval_frame import OptimizedModule

    ids = {id(p) for p in params}
    best = None
    with warnings.catch_warnings():  # touching every object wakes deprecated ones
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.nn.Module) or isinstance(obj, OptimizedModule):
                    continue
            except ReferenceError:  # a weak proxy whose object is gone
                continue
            held = [id(p) for p in obj.parameters()]
            if len(held) >= len(ids) and (best is None or len(held) < best[0]) and ids.issubset(held):
                best = (len(held), obj)
    return best[1] if best is not None else None


def _wrapped_modules(clips: dict):
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
        if clip is not None:
            yield mod, clip


def _backend_of(obj, clips: dict, depth: int = 8):
    """The clip (among ``clips``, by id) behind a ``torch.compile`` wrapper, following Dynamo's
    wrappers, or None. By identity: some wrappers are not hashable."""
    for _ in range(depth):
        if id(obj) in clips:
            return clips[id(obj)]
        named = _named_clip(obj)  # backend="compileclip": the clip lives in the options
        if named is not None:
            return clips.get(id(named))
        nxt = next((getattr(obj, a) for a in _LINKS if getattr(obj, a, None) is not None), None)
        if nxt is None and callable(obj) and getattr(obj, "__closure__", None):
            # Module.compile's function closes over the Dynamo context
            nxt = next((c.cell_contents for c in obj.__closure__ if hasattr(c.cell_contents, "callback")), None)
        if nxt is None:
            return None
        obj = nxt
    return None


def _named_clip(obj):
    """The clip of a ``torch.compile(..., backend="compileclip", options=...)`` wrapper, if
    ``obj`` is one and its clip exists (``registry.clip_for``)."""
    from .registry import compileclip_backend

    if getattr(obj, "compiler_fn", None) is not compileclip_backend:
        return None
    options = getattr(obj, "kwargs", {}).get("options")
    return options.get("clip") if isinstance(options, dict) else None


def find_optimizers(rt) -> None:
    """The optimizers that hold leaves of ``rt``'s scope become known to it: an unknown optimizer
    is stepping after a backward of the clip, before any optimizer of the clip's own stepped (the
    first iteration of a loop that steps another model's optimizer first). Once per scope."""
    if _searched.get(rt) == rt.scope.version:
        return
    found = []
    with warnings.catch_warnings():  # touching every object wakes deprecated ones
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.optim.Optimizer):
                    found.append(obj)
            except ReferenceError:  # a weak proxy whose object is gone
                continue
    for opt in found:
        if rt.scope.claims(opt):
            rt.scope.know(opt)
    _searched[rt] = rt.scope.version


def complete_group(rt, group) -> bool:
    """Before a group's first clip: if leaves of its units with a gradient are held by none of
    its known optimizers (Muon over the matrices, AdamW over the rest, whose first step comes
    second), find the other optimizers (``find_optimizers``) so that the clip covers what eager
    ``clip_grad_norm_(model.parameters())`` covers. True if the scope changed."""
    if group.explicit or not group.units:
        return False
    checked = _completed.get(rt)
    if checked is not None and checked.get(id(group.key)) == rt.scope.version:  # once per change of the scope
        return False
    checked = _completed.setdefault(rt, {})
    checked[id(group.key)] = rt.scope.version
    held = {id(p) for o in group.optimizers for g in o.param_groups for p in g["params"]}
    if all(id(p) in held for u in group.units for p in u.params() if p.grad is not None):
        return False
    version = rt.scope.version
    find_optimizers(rt)
    return rt.scope.version != version


def warn_if_graphless(rt, opt) -> None:
    if rt.graphs == 0 and rt.scope.units:
        rt.warn_once(
            "graphless",
            "this clip has compiled no graph (Dynamo ran its model eagerly: a module it skips such "
            "as nn.LSTM, or its recompile limit). It clipped the step of "
            f"{type(opt).__name__} eagerly instead, over the group's parameters (the same result "
            "as eager clip_grad_norm_, without the fusion)")
