"""The ``torch.compile`` backend: finds the parameters, adds the norm to the backward graphs,
compiles optimizer steps with the clip inside, and registers with the step hooks."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.fx as fx

from . import clipmath, hooks, identity
from .compiling import compile_graph, inductor_patches
from .config import ClipConfig
from .passes import insert_grad_norm
from .runtime import ClipRuntime
from .step import CompiledStep, compile_step_graph, is_fused, is_step_graph


def _frame_modules() -> list[torch.nn.Module]:
    """The modules in the locals of the frame Dynamo is compiling (``self``, or the module a
    wrapper closes over): their parameters are what ``clip_grad_norm_(model.parameters())``
    clips, including those of submodules Dynamo leaves out of the graph."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = InstructionTranslator.current_tx().f_locals
    except (ImportError, AttributeError, RuntimeError, AssertionError):  # not under Dynamo
        return []
    mods = []
    for v in f_locals.values():
        if isinstance(v, torch._dynamo.eval_frame.OptimizedModule):
            v = v._orig_mod
        if isinstance(v, torch.nn.Module):
            mods.append(v)
    return mods


def _has_sparse_grads(mods: list[torch.nn.Module], gm: fx.GraphModule) -> bool:
    sparse_mods = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    if any(isinstance(m, sparse_mods) and m.sparse for mod in mods for m in mod.modules()):
        return True
    fns = (torch.nn.functional.embedding, torch.nn.functional.embedding_bag)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in fns and (n.kwargs.get("sparse") is True or True in n.args[2:]):
            return True
    return False


def _grad_outputs(gm: fx.GraphModule, param_idx: dict[int, Any]) -> list[tuple[int, int]]:
    """(backward output position, Dynamo input index) of each parameter's gradient."""
    out = gm.graph.output_node() if hasattr(gm.graph, "output_node") else next(
        n for n in reversed(gm.graph.nodes) if n.op == "output")
    descs = out.meta.get("desc")
    pairs = []
    for pos, node in enumerate(out.args[0]):
        if not isinstance(node, fx.Node):
            continue
        idx = getattr(getattr(descs[pos], "grad_of", None), "idx", None) if descs is not None else pos
        if idx in param_idx:
            pairs.append((pos, idx))
    return pairs


def _norm_in_backward(rt: ClipRuntime, norm_type: float, param_idx, gm: fx.GraphModule, example_inputs, *, patches):
    """Add the norm of the parameters' gradients to a partitioned backward graph (the
    gradients themselves are left as they are: only the step knows they are final)."""
    out = gm.graph.output_node() if hasattr(gm.graph, "output_node") else next(
        n for n in reversed(gm.graph.nodes) if n.op == "output")
    # the norm is one opaque operator (passes.norm_op) that reads the gradients as returned,
    # bf16/fp16 ones after their rounding, as eager reads .grad (an Inductor reduction fused
    # into the producer read them before rounding: 2.9e-5 apart on a bf16 MLP)
    positions = _grad_outputs(gm, param_idx)
    if not positions:
        return example_inputs, lambda compiled: compiled
    per_param = rt.config.per_param_norms
    insertion = insert_grad_norm(
        gm, [pos for pos, _ in positions], norm_type, unscale=rt.scaler is not None, parts=per_param,
    )
    if per_param:  # the parts come in the operator's order (by device and dtype)
        positions = [positions[i] for i in insertion.order]
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    device = out.args[0][-1].meta["val"].device
    with fake_mode:
        extra = [torch.empty((), dtype=torch.float32, device=device) for _ in insertion.placeholders]
    grads = [(pos, weakref.ref(param_idx[idx])) for pos, idx in positions]
    cudagraphs = bool(patches.get("triton.cudagraphs", False))

    def wrap(compiled):
        return _NormRecordingBackward(compiled, rt, device, grads, cudagraphs, per_param)

    return [*example_inputs, *extra], wrap


class _NormRecordingBackward:
    """Calls the compiled backward (with the GradScaler's scale, where one is attached), strips
    the norm it returns, and records it with the gradients it covers (``ClipRuntime.record_run``)."""

    def __init__(self, compiled, runtime: ClipRuntime, device, grads: list[tuple[int, Any]], cudagraphs: bool,
                 parts: bool = False) -> None:
        self._boxed_call = True  # an instance attribute: AOTAutograd copies __dict__
        self.compiled = compiled
        self.runtime = runtime
        self.device = device
        # the output position of each gradient, a weak reference to its parameter, their ids
        self.positions = [pos for pos, _ in grads]
        self.params = tuple(pref for _, pref in grads)
        self.ids = frozenset(id(r()) for r in self.params)
        self.cudagraphs = cudagraphs
        self.parts = parts  # the graph also returns each gradient's norm (per_param_norms)

    def __call__(self, args: list[Any]) -> Any:
        rt = self.runtime
        full = [*args, rt.scale_on(self.device)] if rt.scaler is not None else list(args)
        args.clear()  # boxed convention: the callee owns the inputs
        outs = list(self.compiled(full))
        parts = outs.pop() if self.parts else None
        norm = outs.pop()
        if self.cudagraphs:  # the next replay overwrites them
            norm = norm.clone()
            parts = parts.clone() if parts is not None else None
        grads = [outs[pos] for pos in self.positions]
        if identity.has_none(grads):  # a parameter that got no gradient this time
            keep = [g is not None for g in grads]
            params = tuple(r for r, k in zip(self.params, keep) if k)
            if parts is not None:
                parts = parts[torch.tensor([i for i, k in enumerate(keep) if k], device=parts.device)]
            rt.record_run(norm, params, identity.ids(p for p in identity.deref(params) if p is not None),
                          [g for g in grads if g is not None], parts)
        else:
            rt.record_run(norm, self.params, self.ids, grads, parts)
        return outs


class ClipBackend:
    """A ``torch.compile`` backend that clips gradients like ``clip_grad_norm_`` at every
    optimizer step, exactly where eager code clips (see ``clip_backend``)."""

    def __init__(self, config: ClipConfig, scaler=None) -> None:
        self.config = config
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                "scaler must be a torch.amp.GradScaler (or torch.cuda.amp.GradScaler) or None, "
                f"got {type(scaler).__name__}"
            )
        # a disabled scaler leaves the gradients unscaled
        self._runtime = ClipRuntime(config, scaler if scaler is not None and scaler.is_enabled() else None)
        hooks.register(self)

    # -- public state ---------------------------------------------------------------------
    @property
    def total_norm(self) -> torch.Tensor:
        """Pre-clip total norm of the gradients of the last optimizer step this clip clipped
        (0-d float32, on the gradients' device, no host sync): eager ``clip_grad_norm_``'s return
        value. Read it after ``opt.step()``."""
        if not self.config.computes_norm:
            raise RuntimeError(
                "compileclip: clip_backend(max_norm=None, clip_value=...) clips values only "
                "and computes no total norm (eager clip_grad_value_ returns None too)"
            )
        if self._runtime.total_norm is None:
            raise RuntimeError(
                "compileclip: no optimizer step has been clipped yet. The clip runs at "
                "opt.step() (as eager clip_grad_norm_ right before it): read total_norm after the step"
            )
        return self._runtime.total_norm

    @property
    def max_norm(self):
        """What was given as ``max_norm``: a number, a 0-d tensor, a policy, or None."""
        return self.config.max_norm

    @property
    def skipped_steps(self) -> torch.Tensor:
        """Steps that left the parameters untouched because the total norm was nan/inf
        (``skip_nonfinite=True``, or a GradScaler overflow in a compiled step). A 0-d int64
        device tensor."""
        rt = self._runtime
        return torch.zeros((), dtype=torch.int64) if rt.skipped_steps is None else rt.skipped_steps

    @property
    def stats(self) -> dict[str, int]:
        """Counters: steps by path (``step_in_graph``, ``step_eager``, ``step_after_closure``),
        where the norm came from (``norm_from_backward``: every gradient's norm from the
        backward graphs; ``norm_at_step``: some computed at the step), ``backward_graph_runs``."""
        return dict(self._runtime.stats)

    # -- monitoring (compileclip.monitor): device tensors, no host sync --------------------
    @property
    def history(self) -> torch.Tensor:
        """The pre-clip total norms of the last ``history`` clipped steps, oldest first (1-D
        float32 on the device; needs ``history=N``)."""
        return self._runtime.monitors.get().history

    @property
    def thresholds(self) -> torch.Tensor:
        """The threshold each step of ``history`` clipped at, aligned with it: ``max_norm``, an
        adaptive policy's, ``inf`` for a step a policy left alone, ``nan`` for AGC."""
        return self._runtime.monitors.get().thresholds

    @property
    def threshold(self) -> torch.Tensor:
        """The threshold of the last clipped step (0-d float32 on the device)."""
        thr = self._runtime.monitors.get().threshold
        if thr is None:
            raise RuntimeError("compileclip: no optimizer step has been clipped yet; read threshold after opt.step()")
        return thr

    def suggest_max_norm(self, q: float = 0.95) -> float:
        """The ``q``-quantile of the finite norms in ``history``: a fixed ``max_norm`` for the
        next run, by the usual recipe (log the norm of a stable run, clip near its 95th
        percentile). The one call that reads the history on the host."""
        return self._runtime.monitors.get().suggest_max_norm(q)

    @property
    def param_norms(self) -> torch.Tensor:
        """The pre-clip norm of each gradient of the last step (1-D float32, device; needs
        ``per_param_norms=True``). ``named_norms`` says whose."""
        mon = self._runtime.monitors.get()
        mon.check_param_norms()
        return mon.param_norms

    def named_norms(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``{name: pre-clip norm of that parameter's gradient}`` for the parameters of
        ``model`` the last step clipped (0-d device tensors: views of ``param_norms``)."""
        return self._runtime.monitors.get().named_norms(model)

    def plot(self, path, *, title: str | None = None) -> None:
        """Write a PNG of ``history``: the norm per step, the threshold per step, the clipped
        steps marked, and ``suggest_max_norm(0.95)``. Needs matplotlib
        (``pip install compileclip[plot]``)."""
        self._runtime.monitors.get().plot(path, title=title)

    def monitor(self, optimizer: torch.optim.Optimizer | None = None):
        """The record of ``optimizer``'s steps (``history``, ``thresholds``, ``threshold``,
        ``suggest_max_norm``, ``param_norms``, ``named_norms``, ``plot``): one per optimizer,
        so a GAN's generator and discriminator each have their own norms and policy
        statistics, as two eager clips would. The clip's own properties read the only one."""
        return self._runtime.monitors.get(optimizer)

    def state_dict(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """The history and the policy's statistics, to save with a checkpoint."""
        return self._runtime.monitors.get(optimizer).state_dict()

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Resume from ``state_dict()``: before the first step, or any time after. Without
        ``optimizer``, it goes to the only optimizer this clip clips (the first one to step)."""
        self._runtime.monitors.load(state, optimizer)

    def compile_step(self, optimizer: torch.optim.Optimizer, **compile_kwargs) -> CompiledStep:
        """The optimizer's step, compiled with the clip folded into its update loop. Call it
        instead of ``optimizer.step()``. A fused optimizer (``fused=True``), which Dynamo does
        not trace, steps eagerly after an eager clip."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"compile_step needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        rt = self._runtime
        if is_fused(optimizer):
            rt.add_step_optimizer(optimizer, fused=True)
            return CompiledStep(optimizer, None, rt)
        rt.add_step_optimizer(optimizer)
        return CompiledStep(optimizer, torch.compile(optimizer.step, backend=self, **compile_kwargs), rt)

    def accumulate(self):
        """Deprecated and no longer needed: the clip runs at ``opt.step()``, over the
        accumulated gradients, like eager clipping. Kept as a no-op context manager."""
        import contextlib
        import warnings

        warnings.warn("compileclip: clip.accumulate() is no longer needed (the clip runs at opt.step())",
                      DeprecationWarning, stacklevel=2)
        return contextlib.nullcontext()

    # -- the backend ----------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None,
                 options: dict | None = None) -> Any:
        try:
            return self._compile(gm, example_inputs, mode, options)
        except BaseException:
            # Dynamo keeps a backend that raised alive: it must not take unknown optimizers
            self._runtime.failed = True
            raise

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any], mode, options) -> Any:
        patches = inductor_patches(mode, options)
        rt = self._runtime
        if is_step_graph(gm):  # torch.compile(opt.step): clip inside the step (step.py)
            return compile_step_graph(self, gm, example_inputs, patches)
        mods = _frame_modules()
        if _has_sparse_grads(mods, gm):
            raise clipmath.sparse_error("the model compiled with this clip")
        param_idx = {
            i: t for i, t in enumerate(example_inputs)
            if isinstance(t, torch.nn.Parameter) and t.requires_grad
        }
        rt.add_modules(mods)
        for mod in mods:
            rt.add_params(mod.parameters())
        rt.add_params(param_idx.values())
        rt.graph_compiled()
        rewrite = None
        if param_idx and self.config.fuse and (self.config.computes_norm or rt.scaler is not None):
            # no reference to self: AOTAutograd may keep this past torch._dynamo.reset(), and a
            # live ClipBackend hears every optimizer step (a bare runtime hears none)
            rewrite = functools.partial(_norm_in_backward, rt, self.config.norm_type, param_idx, patches=patches)
        compiled = compile_graph(self.config.inner, gm, example_inputs, backward_rewrite=rewrite, config_patches=patches)

        return compiled


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
    history: int | None = None,
    per_param_norms: bool = False,
) -> ClipBackend:
    """A ``torch.compile`` backend that clips gradients like ``clip_grad_norm_`` (and/or
    ``clip_grad_value_`` with ``clip_value``) right before every optimizer step::

        clip = clip_backend(max_norm=1.0)
        model = torch.compile(model, backend=clip)
        step = clip.compile_step(opt)      # optional: the clip folds into the update loop
        loss_fn(model(x), y).backward()
        step()                             # or opt.step(): clipped either way
        clip.total_norm                    # pre-clip norm, device tensor, no sync

    The clip covers the parameters of the stepping optimizer that have a ``.grad``, as eager
    ``clip_grad_norm_(opt_params, ...)`` right before ``opt.step()``. The backward graphs
    compute the norm where the gradients are produced; the step uses it where it provably is
    the norm of the final ``.grad``. ``scaler``: the ``torch.amp.GradScaler`` whose scaled
    gradients a compiled step unscales (see the README). ``max_norm`` may be an adaptive
    policy: ``Percentile`` (AutoClip), ``ZScore`` (ZClip) or ``AGC`` (NFNets).
    ``history=N`` keeps the last N norms and thresholds on the device (``history``,
    ``suggest_max_norm``, ``plot``); ``per_param_norms=True`` keeps each gradient's norm of
    the last step (``named_norms``). Arguments are validated here, before anything compiles
    (see ``ClipConfig``).
    """
    return ClipBackend(
        ClipConfig(max_norm=max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite,
                   clip_value=clip_value, skip_nonfinite=skip_nonfinite,
                   inner=inner, fuse=fuse, step_writes_grad=step_writes_grad,
                   history=history, per_param_norms=per_param_norms),
        scaler=scaler,
    )

