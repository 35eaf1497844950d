"""The backend by name: ``torch.compile(model, backend="compileclip", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point (``pyproject.toml``), for code that
chooses a backend by a string from its configuration. ``options`` holds ``clip_backend``'s
keyword arguments (``max_norm`` is required), plus ``"inductor"``: Inductor's own options for
the inner compile. Torch passes the same ``options`` dict to every graph of one
``torch.compile`` call, so the clip lives in it, under ``"clip"``, made at the first graph (or
by ``clip_of``): one ``torch.compile`` call, one clip. ``compileclip.clip_of(compiled_model)``
is the handle (``total_norm``, ``compile_step``, ``state_dict``), for a named backend as for
``backend=clip``. Call it once before training: a module Dynamo compiles no graph for (one of
torch.nn's own, compiled directly) never calls the backend, so only a clip made by ``clip_of``
exists to find it and clip its optimizer eagerly (``discover.py``).
"""

from __future__ import annotations

import inspect

from .backend import ClipBackend, clip_backend

_KEY = "clip"
_INDUCTOR = "inductor"


def _allowed() -> list[str]:
    return [p for p in inspect.signature(clip_backend).parameters] + [_INDUCTOR]


def clip_for(options) -> ClipBackend:
    """The clip of one ``torch.compile(..., backend="compileclip", options=options)`` call."""
    if not isinstance(options, dict) or options.get("max_norm", options.get(_KEY)) is None:
        raise ValueError(
            "compileclip: backend='compileclip' needs options={'max_norm': ...} (and any other "
            f"clip_backend argument: {', '.join(_allowed())}), got options={options!r}")
    clip = options.get(_KEY)
    if isinstance(clip, ClipBackend):
        return clip
    unknown = sorted(set(options) - set(_allowed()) - {_KEY})
    if unknown:
        raise ValueError(f"compileclip: unknown option(s) {unknown} for backend='compileclip'; "
                         f"allowed: {', '.join(_allowed())}")
    kwargs = {k: v for k, v in options.items() if k not in (_INDUCTOR, _KEY)}
    clip = options[_KEY] = clip_backend(**kwargs)
    return clip


def compileclip_backend(gm, example_inputs, *, options=None, mode=None):
    """The entry point's backend: the clip of ``options`` compiles the graph."""
    clip = clip_for(options)
    return clip(gm, example_inputs, mode=mode, options=options.get(_INDUCTOR))


def clip_of(compiled) -> ClipBackend:
    """The clip behind a compiled module or function: ``torch.compile(m, backend=clip)``,
    ``m.compile(backend=clip)`` or ``torch.compile(m, backend="compileclip", options=...)``."""
    from .discover import _LINKS

    obj, seen = compiled, 0
    stack = [compiled]
    while stack and seen < 32:
        obj = stack.pop()
        seen += 1
        if isinstance(obj, ClipBackend):
            return obj
        kwargs = getattr(obj, "kwargs", None)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("options"), dict) and (
                getattr(obj, "compiler_fn", None) is compileclip_backend):
            return clip_for(kwargs["options"])
        for link in (*_LINKS, "_compiled_call_impl", "compiler_fn"):
            nxt = getattr(obj, link, None)
            if nxt is not None:
                stack.append(nxt)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                stack.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    raise ValueError(f"compileclip: {type(compiled).__name__} was not compiled with a compileclip clip "
                     "(torch.compile(model, backend=clip) or backend='compileclip')")
