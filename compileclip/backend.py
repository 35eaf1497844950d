"""The ``torch.compile`` backend: finds the parameters, inserts the clip, wires the runtime."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from .config import ClipConfig
from .passes import insert_grad_norm_clip
from .runtime import ClipRuntime, GraphInfo
from .step import compile_step, is_step_graph

def _frame_modules() -> list[torch.nn.Module]:
    """The modules in the locals of the frame Dynamo is compiling (``self``, or the module a
    wrapper closes over). Their parameters are what eager ``clip_grad_norm_(model.parameters())``
    would clip, including those of submodules Dynamo leaves out of the graph."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        f_locals = tx.f_locals
    except Exception:  # not under Dynamo (a direct call of the backend) or API moved
        return []
    mods = []
    for v in f_locals.values():
        if isinstance(v, torch._dynamo.eval_frame.OptimizedModule):
            v = v._orig_mod
        if isinstance(v, torch.nn.Module):
            mods.append(v)
    return mods


def _grad_positions(gm: fx.GraphModule, graph_param_idx: dict[int, int]) -> list[tuple[int, int]]:
    """(backward output position, Dynamo input index) for each parameter's gradient."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outputs = out.args[0]
    descs = out.meta.get("desc")
    pairs = []
    for pos, node in enumerate(outputs):
        if not isinstance(node, fx.Node):
            continue
        if descs is not None:
            grad_of = getattr(descs[pos], "grad_of", None)
            idx = getattr(grad_of, "idx", None)
        else:  # older layouts: one output per flat forward input, in order
            idx = pos
        if idx in graph_param_idx:
            pairs.append((pos, idx))
    return pairs


@contextlib.contextmanager
def _no_autograd_cache() -> Iterator[None]:
    """AOTAutograd's cache does not key on ``inner_compile``: a warm entry from a plain
    Inductor compile of the same graph would come back unclipped, and one of ours would come
    back without the wrapper that feeds its extra inputs. The environment variable
    TORCHINDUCTOR_AUTOGRAD_CACHE=1 overrides a config patch; then only disabling all caches
    for our compiles keeps the AOT cache out (Inductor's FX graph cache with it)."""
    from torch._functorch._aot_autograd import autograd_cache

    with torch._functorch.config.patch(enable_autograd_cache=False):
        forced = autograd_cache.should_use_local_autograd_cache()
        with torch.compiler.config.patch(force_disable_caches=True) if forced else contextlib.nullcontext():
            yield


class _ClippedBackward:
    """Calls the compiled backward with the runtime inputs the pass added, strips the total
    norm it returns, and reports both to the runtime."""

    def __init__(self, compiled, runtime: ClipRuntime, graph: GraphInfo, device, grad_params, cudagraphs, compile_norm_only=None) -> None:
        # an instance attribute: AOTAutograd wraps us with functools.wraps, which copies
        # __dict__ but not class attributes
        self._boxed_call = True
        self.compiled = compiled
        self.runtime = runtime
        self.graph = graph
        self.device = device
        self.grad_params = grad_params  # (output position, param id)
        self.grad_ids = frozenset(key for _, key in grad_params)
        self.cudagraphs = cudagraphs
        # the variant for backwards whose clip a compiled step applies: the norm only,
        # gradients untouched; compiled when first needed
        self._compile_norm_only = compile_norm_only
        self._norm_only = None

    def _variant(self, rt: ClipRuntime):
        if rt.mode != "step" or self._compile_norm_only is None:
            return self.compiled
        if self._norm_only is None:
            self._norm_only = self._compile_norm_only()
        return self._norm_only

    def __call__(self, args: list[Any]) -> Any:
        rt = self.runtime
        clip = rt.begin_backward_graph(self.graph)
        full = [*args, *rt.graph_inputs(self.device, clip)]
        args.clear()  # boxed convention: the callee owns the inputs
        outs = self._variant(rt)(full)
        outs = list(outs)
        total = outs.pop()
        if self.cudagraphs:  # the next replay overwrites it
            total = total.clone()
        if clip and rt.config.max_norm is not None:
            rt.total_norm = total
        if rt.mode == "step" and rt.step_check and rt.config.computes_norm:
            rt.step_norm = (total, self.grad_ids)
        if rt.checking:
            rt.expect({key: outs[pos] for pos, key in self.grad_params if outs[pos] is not None})
        return outs


class ClipBackend:
    """A ``torch.compile`` backend that clips gradients by their total norm inside the
    compiled backward graph, giving the same ``.grad`` as eager ``clip_grad_norm_``.

    Use one object per model. After each ``backward()``, ``total_norm`` is the pre-clip
    total norm as a 0-d float32 device tensor (no host sync). Where the fused path cannot be
    exact (graph breaks, several forwards per backward, accumulated ``.grad``, gradients from
    outside the compiled region), the clip runs over the final ``.grad`` at the end of the
    backward instead, with a one-time warning. Given to ``torch.compile(opt.step, ...)``, it
    clips inside the compiled optimizer step instead (``compileclip.step``).
    """

    def __init__(self, config: ClipConfig, scaler=None) -> None:
        self.config = config
        self._runtime = ClipRuntime(config)
        self._graphs: list[GraphInfo] = []
        self._step_hooked: set[int] = set()
        if scaler is not None:
            if not isinstance(scaler, torch.amp.GradScaler):
                raise TypeError(
                    "scaler must be a torch.amp.GradScaler (or torch.cuda.amp.GradScaler) or "
                    f"None, got {type(scaler).__name__}"
                )
            if scaler.is_enabled():  # a disabled scaler leaves the gradients unscaled
                self._runtime.scaler = scaler

    # -- public state ---------------------------------------------------------------------
    @property
    def total_norm(self) -> torch.Tensor:
        """Pre-clip total norm of the last clip (0-d float32, grads' device). With a
        GradScaler attached, the norm of the unscaled gradients."""
        if not self.config.computes_norm:
            raise RuntimeError(
                "compileclip: clip_backend(max_norm=None, clip_value=...) clips values only "
                "and computes no total norm (eager clip_grad_value_ returns None too)"
            )
        if self._runtime.total_norm is None:
            if not self._graphs:
                raise RuntimeError(
                    "compileclip: no graph was compiled with this backend, so no gradient "
                    "was clipped. Either no compiled forward/backward has run yet, or Dynamo "
                    "ran the whole model eagerly (it skips modules such as nn.LSTM/nn.GRU on "
                    "some torch versions): check torch._dynamo.explain(model)(inputs)."
                )
            raise RuntimeError("compileclip: no backward has been clipped yet")
        return self._runtime.total_norm

    @property
    def max_norm(self) -> float | torch.Tensor | None:
        return self.config.max_norm

    @property
    def skipped_steps(self) -> torch.Tensor:
        """How many compiled optimizer steps left the parameters untouched because the total
        norm was nan/inf (``skip_nonfinite=True``) or, with a GradScaler attached, the scaled
        gradients overflowed. A 0-d int64 device tensor, updated without a host sync."""
        rt = self._runtime
        if rt.skipped_steps is None:
            return torch.zeros((), dtype=torch.int64)
        return rt.skipped_steps

    @property
    def stats(self) -> dict[str, int]:
        """How many backwards took each path: fused, probe, deferred, off (inside
        ``accumulate()``), step (left to a compiled optimizer step of this backend); and
        step_norm_from_backward: how many compiled steps took the total norm from the
        backward instead of computing it."""
        return dict(self._runtime.mode_counts)

    def compile_step(self, optimizer: torch.optim.Optimizer, **compile_kwargs):
        """``torch.compile(optimizer.step, backend=self, **compile_kwargs)``, plus a safety
        net: a step pre-hook that clips eagerly whenever the step runs uncompiled (Dynamo
        falls back to eager at its recompile limit, silently for the clip otherwise). The
        hook is registered before the first trace, so it costs no recompile."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"compile_step needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if id(optimizer) not in self._step_hooked:
            optimizer.register_step_pre_hook(self._runtime.eager_step_hook())
            self._step_hooked.add(id(optimizer))
        return torch.compile(optimizer.step, backend=self, **compile_kwargs)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Backwards inside this block add to ``.grad`` unclipped; the next backward outside
        it clips the accumulated ``.grad``, as eager ``clip_grad_norm_`` would after the
        last micro-batch."""
        prev = self._runtime.accumulating
        self._runtime.accumulating = True
        try:
            yield
        finally:
            self._runtime.accumulating = prev

    # -- the backend ----------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        if is_step_graph(gm):  # torch.compile(opt.step): clip inside the step (step.py)
            return compile_step(self, gm, example_inputs)
        rt = self._runtime
        param_idx = {
            i: t for i, t in enumerate(example_inputs)
            if isinstance(t, torch.nn.Parameter) and t.requires_grad
        }
        for mod in _frame_modules():
            rt.add_params(mod.parameters())
        rt.add_params(param_idx.values())
        graph = GraphInfo(list(param_idx.values()))
        self._graphs.append(graph)
        if not param_idx or not self.config.fuse:
            # nothing to clip in the graph: the parameter hooks start the exact
            # end-of-backward path for every backward that reaches a known parameter
            return self._compile(gm, example_inputs, None)
        compiled = self._compile(gm, example_inputs, functools.partial(self._clip_backward, graph, param_idx))

        def forward(*args):
            rt.on_forward(graph)
            return compiled(*args)

        if getattr(compiled, "_boxed_call", False):
            forward._boxed_call = True
        return forward

    def _clip_backward(self, graph: GraphInfo, param_idx, gm: fx.GraphModule, example_inputs, compile_variant=None, **kwargs):
        """Rewrite a partitioned backward graph; returns (extra inputs, wrap fn).
        ``compile_variant(gm, inputs)`` compiles another rewrite of the same graph later
        (for the norm-only variant)."""
        positions = _grad_positions(gm, param_idx)
        cfg = self.config
        amp = self._runtime.scaler is not None

        def rewrite(g: fx.GraphModule, norm_only: bool):
            return insert_grad_norm_clip(
                g,
                [pos for pos, _ in positions],
                cfg.norm_type,
                guard_nonfinite=cfg.error_if_nonfinite,
                clip_norm=cfg.max_norm is not None or (norm_only and (cfg.computes_norm or amp)),
                clip_value=cfg.clip_value is not None,
                unscale=amp,
                norm_only=norm_only,
                keep_nonfinite=amp or cfg.skip_nonfinite,
            )

        original = None
        if compile_variant is not None:
            with torch._subclasses.fake_tensor.unset_fake_temporarily():
                original = copy.deepcopy(gm)  # as AOTAutograd copies it for a lazy compile
        insertion = rewrite(gm, norm_only=False)
        from torch._guards import detect_fake_mode

        fake_mode = detect_fake_mode(example_inputs)
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        device = out.args[0][-1].meta["val"].device
        with fake_mode:
            extra = [
                torch.empty((), dtype=torch.bool if name == "clip_enabled" else torch.float32, device=device)
                for name in insertion.placeholders
            ]
        grad_params = [(pos, id(param_idx[idx])) for pos, idx in positions]
        cudagraphs = kwargs.get("cudagraphs")
        inputs = [*example_inputs, *extra]

        def compile_norm_only():
            rewrite(original, norm_only=True)
            return compile_variant(original, inputs)

        def wrap(compiled):
            return _ClippedBackward(
                compiled, self._runtime, graph, device, grad_params,
                bool(cudagraphs) if cudagraphs is not None else False,
                compile_norm_only if original is not None else None,
            )

        return inputs, wrap

    def _compile(self, gm: fx.GraphModule, example_inputs, clip_backward):
        if self.config.inner == "aot_eager":
            return self._compile_aot_eager(gm, example_inputs, clip_backward)
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner_compile(g, inputs, **kwargs):
            if clip_backward is None or not kwargs.get("is_backward", False):
                return compile_fx_inner(g, inputs, **kwargs)
            # AOTAutograd compiles a backward lazily, at its first run, inside these
            # contexts; a variant compiled later re-enters them the same way
            tracing_context = torch._guards.TracingContext.try_get()
            compile_context = torch._guards.CompileContext.try_get()

            def compile_variant(variant, variant_inputs):
                with torch._guards.tracing(tracing_context), torch._guards.compile_context(compile_context):
                    return compile_fx_inner(variant, variant_inputs, **kwargs)

            inputs, wrap = clip_backward(g, inputs, compile_variant=compile_variant, **kwargs)
            return wrap(compile_fx_inner(g, inputs, **kwargs))

        with _no_autograd_cache():
            return compile_fx(gm, example_inputs, inner_compile=inner_compile)

    def _compile_aot_eager(self, gm, example_inputs, clip_backward):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        def fw(g, inputs):
            return make_boxed_func(g.forward)

        def bw(g, inputs):
            if clip_backward is None:
                return make_boxed_func(g.forward)
            _, wrap = clip_backward(g, inputs, compile_variant=lambda variant, _: make_boxed_func(variant.forward))
            return wrap(make_boxed_func(g.forward))

        with _no_autograd_cache():
            return aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, example_inputs)


def clip_backend(
    max_norm: float | torch.Tensor | None = None,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    *,
    clip_value: float | None = None,
    skip_nonfinite: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    inner: str = "inductor",
    fuse: bool = True,
    step_writes_grad: bool = True,
) -> ClipBackend:
    """A ``torch.compile`` backend that clips gradients like ``clip_grad_norm_`` (and/or
    ``clip_grad_value_`` with ``clip_value``)::

        clip = clip_backend(max_norm=1.0)
        model = torch.compile(model, backend=clip)
        loss_fn(model(x), y).backward()   # .grad is clipped
        clip.total_norm                    # pre-clip norm, device tensor, no sync

    ``scaler``: the ``torch.amp.GradScaler`` that scales the loss. The clip then applies to
    the unscaled gradients, as eager ``scaler.unscale_(opt); clip_grad_norm_(...)`` does
    (see the README for the loop). Arguments are validated here, before anything compiles
    (see ``ClipConfig``).
    """
    return ClipBackend(
        ClipConfig(max_norm=max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite,
                   clip_value=clip_value, skip_nonfinite=skip_nonfinite,
                   inner=inner, fuse=fuse, step_writes_grad=step_writes_grad),
        scaler=scaler,
    )
