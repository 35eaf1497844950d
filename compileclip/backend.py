"""The ``torch.compile`` backend and its public object.

``ClipBackend.__call__`` receives Dynamo's graphs: a graph whose inputs include gradients is a
compiled optimizer step (``step.py``); any other graph is a model's, whose trainable leaves and
frame modules join the clip's scope (``scope.py``) and whose backward gets the norm of each
gradient (``backward.py``). The clip itself happens at the optimizer step (``plan.py``).
"""

from __future__ import annotations

import functools
import types
import weakref
from typing import Any

import torch
import torch.fx as fx

from . import ddp, hooks
from .backward import norm_in_backward
from .compiling import compile_graph, inductor_patches
from .config import ClipConfig
from .instances import GraphLeaves, WatchedForward
from .runtime import ClipRuntime
from .scope import is_wrapper
from .step import compile_step_graph, is_fused, is_step_graph
from .step_call import CompiledStep


def _frame_modules() -> list[torch.nn.Module]:
    """The modules in the locals of the frame Dynamo is compiling (``self``, the module a
    wrapper closes over, or ``args[0]`` of a decorator's ``wrapper(*args, **kwargs)``, such as
    transformers' ``deprecate_kwarg`` around ``forward``): their parameters are what
    ``clip_grad_norm_(model.parameters())`` clips, including those of submodules Dynamo leaves
    out of the graph, in that order."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = InstructionTranslator.current_tx().f_locals
    except (ImportError, AttributeError, RuntimeError, AssertionError):  # not under Dynamo
        return []
    mods = []
    for v in f_locals.values():
        for m in v if isinstance(v, tuple) else (v,):
            if isinstance(m, torch._dynamo.eval_frame.OptimizedModule):
                m = m._orig_mod
            if isinstance(m, torch.nn.Module) and not any(m is k for k in mods):
                mods.append(m)
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


def sparse_error(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"compileclip: {what} has sparse gradients (nn.Embedding/EmbeddingBag(sparse=True)). "
        "Eager torch.nn.utils.clip_grad_norm_ refuses them too (linalg_vector_norm has no "
        "sparse kernel): use sparse=False, or clip those parameters yourself")


class _WeakBackend:
    """Calls a ``ClipBackend`` it holds weakly."""

    def __init__(self, clip) -> None:
        self._clip = weakref.ref(clip)

    def __call__(self, gm, example_inputs, **kwargs):
        clip = self._clip()
        if clip is None:
            raise RuntimeError("compileclip: the clip this step was compiled with no longer exists")
        return clip(gm, example_inputs, **kwargs)


class _Attachment:
    """What ``clip.attach`` returns: ``remove()`` undoes it, as torch's hook handles do."""

    def __init__(self, clip, optimizer) -> None:
        self._clip, self._optimizer = clip, optimizer

    def remove(self) -> None:
        self._clip._runtime.scope.detach(self._optimizer)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


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
        (0-d float32, float64 for float64 gradients, on the gradients' device, no host sync):
        eager ``clip_grad_norm_``'s return value. Read it after ``opt.step()``."""
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
        """The record of the steps of ``optimizer``'s group (``history``, ``thresholds``,
        ``threshold``, ``suggest_max_norm``, ``param_norms``, ``named_norms``, ``plot``): one per
        group, so a GAN's generator and discriminator each have their own norms and policy
        statistics, as two eager clips would, and a model's two optimizers share one. The
        clip's own properties read the only one."""
        return self._runtime.monitors.get(self._group_key(optimizer))

    def _group_key(self, optimizer):
        """The monitors are kept per group: ``optimizer``'s group's key (None: the only one)."""
        if optimizer is None:
            return None
        return self._runtime.scope.group(optimizer).key

    def state_dict(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """The history and the policy's statistics, to save with a checkpoint."""
        return self._runtime.monitors.get(self._group_key(optimizer)).state_dict()

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Resume from ``state_dict()``: before the first step, or any time after. Without
        ``optimizer``, it goes to the only group this clip clips (the first one to step)."""
        self._runtime.monitors.load(state, self._group_key(optimizer))

    def compile_step(self, optimizer: torch.optim.Optimizer, **compile_kwargs) -> CompiledStep:
        """The optimizer's step, compiled with the clip folded into its update loop. Call it
        instead of ``optimizer.step()``. A fused optimizer (``fused=True``), which Dynamo does
        not trace, and an optimizer that steps another one (``ZeroRedundancyOptimizer``) step
        eagerly after an eager clip."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"compile_step needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._runtime.scope.know(optimizer)
        if is_fused(optimizer) or is_wrapper(optimizer):
            return CompiledStep(optimizer, None, self._runtime)
        # Dynamo keeps the backend of a step that hit its recompile limit alive (a reference
        # from C): a weak proxy lets this clip go, and stop hearing steps, when the user drops it
        backend = _WeakBackend(self)
        raw = type(optimizer).step
        if getattr(raw, "hooked", False):  # torch's Optimizer.step wrapper: CompiledStep does its work
            raw = raw.__wrapped__
        raw = types.MethodType(raw, optimizer)
        return CompiledStep(optimizer, torch.compile(raw, backend=backend, **compile_kwargs), self._runtime, raw)

    def comm_hook(self, hook=None):
        """A DDP communication hook that runs ``hook`` (a ``(state, bucket) -> Future`` of your
        own; DDP's default mean when None) and hands the clip the norm of each reduced gradient,
        so that the step norms nothing: ``ddp.register_comm_hook(state, clip.comm_hook(hook))``.
        Without it the clip installs its own hook on the DDP module it compiles, where DDP has
        none and the world size is a power of two."""
        if hook is not None and not callable(hook):
            raise TypeError(f"compileclip: comm_hook(hook={hook!r}): hook must be a DDP communication "
                            "hook, a callable (state, bucket) -> torch.futures.Future, or None")
        return ddp.comm_hook(self._runtime, hook)

    def attach(self, optimizer: torch.optim.Optimizer, parameters=None) -> _Attachment:
        """Tell the clip about an optimizer it cannot infer, naming the parameters as eager code
        does. ``attach(opt)``: ``opt``'s steps are clipped, over its group (its parameters, with
        the modules compiled with this clip whose leaves it holds), as
        ``clip_grad_norm_(opt's parameters)`` right before ``opt.step()`` for an optimizer of
        fp32 master copies. ``attach(opt, parameters=ps)``: ``clip_grad_norm_(ps)`` before
        ``opt``'s steps; ``parameters=[]``: ``opt``'s steps are not clipped. Before the first
        step. Returns a handle whose ``remove()`` undoes it."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if parameters is not None:
            if isinstance(parameters, torch.Tensor):
                parameters = [parameters]
            parameters = list(parameters)
            bad = [type(p).__name__ for p in parameters if not isinstance(p, torch.Tensor)]
            if bad:
                raise TypeError(f"attach(parameters=...) takes tensors, got {', '.join(sorted(set(bad)))}")
            if any(p.is_sparse or p.layout != torch.strided for p in parameters if p.grad is not None):
                raise NotImplementedError(sparse_error("a parameter given to attach").args[0])
        self._runtime.scope.attach(optimizer, parameters)
        if not hooks.registered(self):
            hooks.register(self)
        return _Attachment(self, optimizer)

    def remove(self) -> None:
        """Stop clipping: this clip hears no more optimizer steps (its compiled graphs still run,
        computing norms nobody reads). As ``RemovableHandle.remove()`` for torch's hooks."""
        hooks.remove(self)

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
        from torch._dynamo.exc import RestartAnalysis

        try:
            return self._compile(gm, example_inputs, mode, options)
        except RestartAnalysis:  # Dynamo's signal to trace again, not a failure
            raise
        except BaseException:
            # Dynamo keeps a backend that raised alive: it must not take unknown optimizers
            self._runtime.compile_failed()
            raise

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any], mode, options) -> Any:
        patches = inductor_patches(mode, options)
        rt = self._runtime
        if is_step_graph(gm):  # torch.compile(opt.step): clip inside the step (step.py)
            return compile_step_graph(self, gm, example_inputs, patches)
        mods = _frame_modules()
        if _has_sparse_grads(mods, gm):
            raise sparse_error("the model compiled with this clip")
        # the trainable leaves entering the graph: nn.Parameters and plain tensors alike
        leaf_idx = {i: t for i, t in enumerate(example_inputs)
                    if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf}
        rt.scope.add_graph(mods, leaf_idx.values())
        rt.graph_compiled()
        leaves = GraphLeaves(rt, leaf_idx)  # and those of the other modules this graph will run for
        rewrite = None
        under_ddp = ddp.active_ddp()
        if under_ddp is not None:
            # the graph sees the local gradients, before DDP averages them: the norms come from
            # DDP's communication hook where the clip can install it, else from the step
            if self.config.fuse and self.config.computes_norm:
                ddp.install(rt, under_ddp)
        elif leaf_idx and self.config.fuse and (self.config.computes_norm or rt.scaler is not None):
            # no reference to self: AOTAutograd may keep this past torch._dynamo.reset(), and a
            # live ClipBackend hears every optimizer step (a bare runtime hears none)
            rewrite = functools.partial(norm_in_backward, rt, leaf_idx, leaves, patches=patches)
        compiled = compile_graph(self.config.inner, gm, example_inputs, backward_rewrite=rewrite, config_patches=patches)
        return WatchedForward(compiled, leaves) if leaves.idx else compiled


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

    Each step clips its group: the modules compiled with this clip whose leaves the stepping
    optimizer holds, and the parameters of every optimizer holding leaves of them, once per
    backward, as eager ``clip_grad_norm_(group, ...)`` right before the group's first step
    (``clip.attach`` names what cannot be inferred; see the README's scope rule). The
    backward graphs compute each gradient's norm where it is produced; the step uses it where
    it provably is the norm of the final ``.grad``. ``scaler``: the ``torch.amp.GradScaler`` whose scaled
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

