"""One way to compile a Dynamo graph for compileclip, with Inductor or aot_eager.

``compile_graph`` takes two optional rewrites, applied where AOTAutograd hands over graphs:
``forward_rewrite(graph, inputs)`` on the forward (or inference) graph in place, and
``backward_rewrite(graph, inputs) -> (inputs, wrap)`` on the partitioned backward, whose
compiled callable is then passed through ``wrap``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx


@contextlib.contextmanager
def no_autograd_cache() -> Iterator[None]:
    """AOTAutograd's cache does not key on ``inner_compile``: a warm entry from a plain
    Inductor compile of the same graph would come back without our rewrites. The environment
    variable TORCHINDUCTOR_AUTOGRAD_CACHE=1 overrides a config patch; then only disabling all
    caches for our compiles keeps the AOT cache out (Inductor's FX graph cache with it)."""
    from torch._functorch._aot_autograd import autograd_cache

    with torch._functorch.config.patch(enable_autograd_cache=False):
        forced = autograd_cache.should_use_local_autograd_cache()
        with torch.compiler.config.patch(force_disable_caches=True) if forced else contextlib.nullcontext():
            yield


def inductor_patches(mode: str | None, options: dict | None) -> dict:
    """``torch.compile(..., mode=..., options=...)`` as Inductor config patches."""
    patches: dict = {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches.update(options or {})
    return patches


def compile_graph(
    inner: str,
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    forward_rewrite: Callable | None = None,
    backward_rewrite: Callable | None = None,
    config_patches: dict | None = None,
):
    with no_autograd_cache():
        if inner == "aot_eager":
            return _aot_eager(gm, example_inputs, forward_rewrite, backward_rewrite)
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner_compile(g, inputs, **kwargs):
            if kwargs.get("is_backward", False):
                if backward_rewrite is not None:
                    inputs, wrap = backward_rewrite(g, inputs)
                    return wrap(compile_fx_inner(g, inputs, **kwargs))
            elif forward_rewrite is not None:
                forward_rewrite(g, inputs)
            return compile_fx_inner(g, inputs, **kwargs)

        return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=config_patches or None)


def _aot_eager(gm, example_inputs, forward_rewrite, backward_rewrite):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def fw(g, inputs):
        if forward_rewrite is not None:
            forward_rewrite(g, inputs)
        return make_boxed_func(g.forward)

    def bw(g, inputs):
        if backward_rewrite is None:
            return make_boxed_func(g.forward)
        _, wrap = backward_rewrite(g, inputs)
        return wrap(make_boxed_func(g.forward))

    return aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, example_inputs)
