"""Run-time state of a clip backend: what each backward did, and the end-of-backward clip.

Every backward that reaches a parameter the backend knows goes through one of four modes:

``fused``     the clip ran inside the single compiled backward graph (fast path);
``probe``     the graph ran unclipped and the clip runs over the final ``.grad``s when the
              backward is done, while hooks check that the fused path would have been exact
              (every gradient came from the one graph, and from nothing else);
``deferred``  like ``probe`` without the check: a condition of the fused path failed;
``off``       inside ``accumulate()``: nothing is clipped;
``step``      the same backend compiled the optimizer step, which clips the final ``.grad``.

A hook on each known parameter sees the summed incoming gradient before it is accumulated.
It is the detector for everything the graphs cannot see: a parameter that also received a
gradient from outside the compiled region, parameters of modules Dynamo did not compile, and
backwards that did not run a compiled backward graph at all (compiled autograd).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable

import torch

from .config import ClipConfig

_EPS = 1e-6
_SEVERAL_GRAPHS = (
    "several compiled backward graphs ran in one backward after only one compiled forward "
    "(a graph kept from an earlier forward with retain_graph=True?)"
)
_ACCUMULATED = (
    ".grad already held values before backward (gradient accumulation: use "
    "`with clip.accumulate():` for all but the last micro-batch)"
)


_USER_HOOKS = (
    "a parameter has gradient hooks of its own (register_hook or "
    "register_post_accumulate_grad_hook), which may change the gradient after the compiled "
    "graph produced it"
)


def _has_user_hooks(p: torch.Tensor) -> bool:
    """Hooks besides compileclip's one tensor hook per parameter."""
    hooks = p._backward_hooks
    return (hooks is not None and len(hooks) > 1) or bool(getattr(p, "_post_accumulate_grad_hooks", None))


def compiled_autograd_active() -> bool:
    ca = torch._dynamo.compiled_autograd
    return bool(
        getattr(ca, "in_compiled_autograd_region", False)
        or getattr(ca, "compiled_autograd_enabled", False)
        or getattr(torch._dynamo.config, "compiled_autograd", False)
    )


COMPILED_AUTOGRAD_ERROR = (
    "compileclip does not support compiled autograd: it replaces the compiled backward "
    "graphs this backend clips in, so the gradients would not be clipped. Run the backward "
    "without compiled autograd (torch._dynamo.config.compiled_autograd=False)."
)


def _queue_end_of_backward(fn) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def total_norm_fp32(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The ``norm_type``-norm of all ``grads`` together, accumulated in float32 (eager
    ``clip_grad_norm_``'s structure: per-tensor norms, then the norm of the norms)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    if not groups:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    norms = []
    for (dev, _), gs in groups.items():
        if dev.type in ("cpu", "cuda", "xpu") and not any(g.is_sparse for g in gs):
            ns = torch._foreach_norm(gs, norm_type, dtype=torch.float32)
        else:
            ns = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in gs]
        norms.extend(n.to(device) for n in ns)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def scale_grads_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    for dev, gs in groups.items():
        torch._foreach_mul_(gs, coef.to(dev))


def nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is "
        "non-finite, so it cannot be clipped. To disable this error and scale the "
        "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
    )


class GraphInfo:
    """One compiled Dynamo graph: the trainable parameters it takes as inputs."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.param_ids = frozenset(id(p) for p in params)


class ClipRuntime:
    def __init__(self, config: ClipConfig) -> None:
        self.config = config
        self.params: dict[int, torch.nn.Parameter] = {}  # every parameter the clip covers
        self._hooks: dict[int, object] = {}
        self._max_norm: dict[torch.device, torch.Tensor] = {}
        self._consts = {}  # (what, device) -> a constant 0-d runtime input
        self.total_norm: torch.Tensor | None = None
        self.accumulating = False
        self.after_accumulate = False  # the last backward ran inside accumulate()
        self.fusable: bool | None = None  # None until a probe backward has run
        self._unfusable_reason = ""
        self._warned: set[str] = set()
        self.mode_counts = {"fused": 0, "probe": 0, "deferred": 0, "off": 0, "step": 0, "step_norm_from_backward": 0}
        self.scaler = None  # an enabled torch.amp.GradScaler whose scaled gradients we clip
        self.skipped_steps: torch.Tensor | None = None  # device counter (skip_nonfinite / AMP)
        self.step_compiled = False  # a compiled optimizer step clips: backwards do not
        self.clipped_since_step = 0  # backwards that clipped since the last compiled step
        # (total norm, ids of the parameters it covers, (param, grad, version, data_ptr) each)
        # of the last backward, when it is the norm of exactly the final .grad: the compiled
        # step may use it instead of computing its own, if no .grad changed since
        self.norm_for_step: tuple[torch.Tensor, frozenset[int], tuple] | None = None
        # optimizer state a skipped first step created, to remove before the next backward
        self._state_drops: list[tuple[torch.optim.Optimizer, dict]] = []
        self._drop_hooks: list = []
        self._reset()

    # -- bookkeeping --------------------------------------------------------------------
    def _reset(self) -> None:
        self.pending_forwards = 0
        self.task_id = None
        self.mode: str | None = None
        self.reason: str | None = None
        self.expected: dict[int, torch.Tensor] = {}
        self.foreign: list[int] = []
        self.mixed: list[int] = []
        self.step_check = False  # mode "step": the hooks check this backward's norm is exact
        self.step_norm: tuple[torch.Tensor, frozenset[int]] | None = None

    def add_params(self, params: Iterable[torch.nn.Parameter]) -> None:
        for p in params:
            if not p.requires_grad or id(p) in self.params:
                continue
            self.params[id(p)] = p
            self._hooks[id(p)] = p.register_hook(self._make_hook(id(p)))

    def _make_hook(self, key: int):
        ref = weakref.ref(self)

        def hook(grad: torch.Tensor) -> None:
            rt = ref()
            if rt is not None:
                rt._on_grad(key, grad)

        return hook

    def warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"compileclip: the fused clip was not used: {reason}. The gradients are "
                "clipped over the final .grad at the end of backward instead (same result "
                "as eager clip_grad_norm_, without the fusion).",
                stacklevel=3,
            )

    # -- runtime inputs -----------------------------------------------------------------
    def max_norm_on(self, device: torch.device) -> torch.Tensor:
        mn = self.config.max_norm
        if isinstance(mn, torch.Tensor):
            if mn.device == device and mn.dtype == torch.float32:
                return mn
            return mn.to(device=device, dtype=torch.float32, non_blocking=True)
        t = self._max_norm.get(device)
        if t is None:
            t = self._max_norm[device] = torch.tensor(mn, dtype=torch.float32, device=device)
        return t

    def _const(self, key, value, dtype, device: torch.device) -> torch.Tensor:
        t = self._consts.get((key, device))
        if t is None:
            t = self._consts[(key, device)] = torch.tensor(value, dtype=dtype, device=device)
        return t

    def scale_on(self, device: torch.device) -> torch.Tensor:
        """The attached GradScaler's current scale (1 before its first ``scale()``)."""
        scale = getattr(self.scaler, "_scale", None)
        if scale is None:
            return self._const("one", 1.0, torch.float32, device)
        return scale if scale.device == device else scale.to(device, non_blocking=True)

    def graph_inputs(self, device: torch.device, clip: bool, scale: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The runtime inputs the passes add, in their order: max_norm, enabled, then
        clip_value and the GradScaler's scale where configured (``scale`` overrides the
        scaler's current one; the step passes 1 when ``unscale_`` already ran)."""
        cfg = self.config
        if cfg.max_norm is None:
            max_norm = self._const("inf", math.inf, torch.float32, device)  # not read
        else:
            max_norm = self.max_norm_on(device)
        out = [max_norm, self._const(("enabled", clip), clip, torch.bool, device)]
        if cfg.clip_value is not None:
            out.append(self._const("value", cfg.clip_value, torch.float32, device))
        if self.scaler is not None:
            out.append(self.scale_on(device) if scale is None else scale)
        return out

    def count_skipped(self, nonfinite: torch.Tensor) -> None:
        """Add a step's nonfinite flag (0-d float 0/1) to the device counter, no sync."""
        if self.skipped_steps is None:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=nonfinite.device)
        self.skipped_steps.add_(nonfinite > 0)

    # -- events -------------------------------------------------------------------------
    def on_forward(self, graph: GraphInfo) -> None:
        if compiled_autograd_active():
            raise RuntimeError(COMPILED_AUTOGRAD_ERROR)
        if torch.is_grad_enabled():
            self.pending_forwards += 1

    def begin_backward_graph(self, graph: GraphInfo) -> bool:
        """Called as a compiled backward graph starts; returns whether it must clip."""
        tid = torch._C._current_graph_task_id()
        if tid != self.task_id or self.mode is None:
            self._start_backward(tid, graph)
        elif self.mode == "probe":
            # a second backward graph in one backward (e.g. a graph kept with
            # retain_graph=True): the first ran unclipped, so the exact path still holds
            self.mode, self.reason = "deferred", _SEVERAL_GRAPHS
        elif self.mode == "step":
            self.step_check, self.step_norm = False, None  # a partial norm: not handed on
        elif self.mode == "fused":
            self.fusable, self._unfusable_reason = False, _SEVERAL_GRAPHS
            raise RuntimeError(
                "compileclip: the gradients of this backward are wrong: they were clipped "
                f"inside the first compiled backward graph, but {_SEVERAL_GRAPHS}. Later "
                "backwards use the exact (unfused) path."
            )
        return self.mode == "fused"

    def drop_state_before_next_backward(self, opt, state_before: dict, params) -> None:
        """Remove the optimizer state entries and keys not in ``state_before`` (param ->
        its state's keys) when the next backward starts. Parameters without this runtime's hooks (a step-only clip) get one-shot
        hooks for that."""
        self._state_drops.append((opt, state_before))
        for p in params:
            if id(p) not in self.params and p.requires_grad:
                self._drop_hooks.append(p.register_hook(self._drop_hook))

    def _drop_hook(self, grad: torch.Tensor) -> None:
        self._run_state_drops()

    def _run_state_drops(self) -> None:
        if not self._state_drops:
            return
        for opt, before in self._state_drops:
            for p in list(opt.state):
                keep = before.get(p)
                if not keep:
                    del opt.state[p]
                else:
                    for key in [k for k in opt.state[p] if k not in keep]:
                        del opt.state[p][key]
        self._state_drops.clear()
        for h in self._drop_hooks:
            h.remove()
        self._drop_hooks.clear()

    def _start_backward(self, tid: int, graph: GraphInfo | None) -> None:
        self._run_state_drops()
        self.task_id = tid
        self.norm_for_step = None  # a new backward changes .grad
        _queue_end_of_backward(self._end_of_backward)
        if self.accumulating:
            self.mode = "off"
            return
        if self.step_compiled:
            # the compiled optimizer step clips the final .grad; where this backward's graph
            # produces every gradient alone (checked by the hooks as in a probe), its norm is
            # handed to the step, which then does not read the gradients for it
            self.mode = "step"
            self.step_check = self.config.fuse and self._why_not_fused(graph, this_backward_only=True) is None
            return
        if self.config.skip_nonfinite and self.clipped_since_step:
            raise RuntimeError(
                "compileclip: skip_nonfinite=True skips updates inside an optimizer step "
                "compiled with this backend, but a second backward ran and no such step has: "
                "compile the step too (step = torch.compile(opt.step, backend=clip)), or "
                "use skip_nonfinite=False"
            )
        reason = self._why_not_fused(graph)
        if reason is None:
            self.mode = "fused" if self.fusable else "probe"
        else:
            self.mode, self.reason = "deferred", reason

    def _why_not_fused(self, graph: GraphInfo | None, this_backward_only: bool = False) -> str | None:
        if not self.config.fuse:
            return "clip_backend(fuse=False)"
        if graph is None:
            return "a backward reached the parameters without running a compiled backward graph (e.g. compiled autograd, or modules Dynamo did not compile)"
        if self.pending_forwards != 1:
            return (
                f"{self.pending_forwards} compiled forwards ran before this backward "
                "(a graph break, or the model called more than once per backward)"
            )
        if not graph.param_ids.issuperset(self.params):
            missing = len(set(self.params) - graph.param_ids)
            return (
                f"{missing} trainable parameters are outside the compiled graph "
                "(a module Dynamo did not compile, or a graph break)"
            )
        for p in self.params.values():
            if p.grad is not None:
                return _ACCUMULATED
            if _has_user_hooks(p):
                return _USER_HOOKS
        if self.fusable is False and not this_backward_only:
            return self._unfusable_reason
        return None

    def _handoff(self, total: torch.Tensor, grad_ids: frozenset[int]):
        """What the step needs to trust this backward's norm: every gradient the graph
        produced is now the ``.grad`` of its parameter (not so after torch.autograd.grad),
        with its identity, version and storage recorded to detect later changes."""
        snapshot = []
        for key in grad_ids:
            p = self.params.get(key)
            g = None if p is None else p.grad
            if g is None:
                return None
            snapshot.append((p, g, g._version, g.data_ptr()))
        return total, grad_ids, tuple(snapshot)

    def eager_step_hook(self):
        """An optimizer step pre-hook for ``ClipBackend.compile_step``: a no-op inside the
        compiled step; when the step runs eagerly (Dynamo fell back, e.g. at its recompile
        limit, or the user called the uncompiled ``opt.step``), it clips eagerly instead, so
        that the step never runs unclipped."""
        ref = weakref.ref(self)

        def hook(opt, args, kwargs):
            if torch.compiler.is_compiling():
                return None
            rt = ref()
            if rt is not None:
                rt._eager_step(opt)
            return None

        return hook

    def _eager_step(self, opt: torch.optim.Optimizer) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        if self.scaler is not None:
            from torch.amp.grad_scaler import OptState

            if self.scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY:
                raise RuntimeError(
                    "compileclip: the optimizer step ran eagerly on gradients the GradScaler "
                    "has not unscaled (Dynamo ran the compiled step eagerly, or opt.step() was "
                    "called directly); call the compiled step, or scaler.step(opt)"
                )
        warnings.warn(
            "compileclip: the optimizer step ran without compilation (Dynamo's recompile "
            "limit, or a direct call of the uncompiled opt.step()); the gradients are "
            "clipped eagerly before it instead (same result, without the fusion)",
            stacklevel=3,
        )
        if not self.begin_step():
            return
        grads = [p.grad for p in params]
        self.clip_(grads, unscaled=True)
        if self.config.skip_nonfinite and not bool(torch.isfinite(self.total_norm)):
            # an optimizer skips parameters whose .grad is None: the eager step is a no-op
            for p in params:
                p.grad = None
            self.count_skipped(torch.ones((), device=grads[0].device))

    def take_norm_for_step(self, param_ids: frozenset[int]) -> torch.Tensor | None:
        """The last backward's total norm, if it is the norm of exactly the gradients of
        ``param_ids`` (the parameters whose ``.grad`` the step graph takes); consumed."""
        handed, self.norm_for_step = self.norm_for_step, None
        if handed is None or handed[1] != param_ids:
            return None
        # .grad replaced or changed in place since the backward (scaler.unscale_, a user's
        # own edit): the step computes the norm itself. About 40 us for 512 parameters.
        if not all(p.grad is g and g._version == v and g.data_ptr() == ptr for p, g, v, ptr in handed[2]):
            return None
        return handed[0]

    def begin_step(self) -> bool:
        """Called as a compiled optimizer step starts; returns whether it must clip (not if
        a backward already clipped these gradients, as the first one does before the step
        is compiled)."""
        clipped, self.clipped_since_step = self.clipped_since_step, 0
        if clipped > 1:
            # before its first call this backend did not know a compiled step would clip, so
            # each of these backwards clipped the .grad accumulated so far: not eager's result
            raise RuntimeError(
                f"compileclip: {clipped} backwards clipped the gradients before the first call "
                "of the optimizer step compiled with this backend (gradient accumulation in the "
                "first step). The result would differ from eager clipping. Run the first step's "
                "micro-batches but the last inside `with clip.accumulate():`; from the second "
                "step on the compiled step clips the final .grad and no context is needed."
            )
        return not clipped

    @property
    def checking(self) -> bool:
        """Whether the hooks check this backward's gradients against the graph's outputs."""
        return self.mode in ("fused", "probe") or (self.mode == "step" and self.step_check)

    def expect(self, grads: dict[int, torch.Tensor]) -> None:
        """The graph's gradient outputs, held until each parameter's hook has seen what
        arrived (holding them also keeps autograd from summing into them in place)."""
        self.expected.update(grads)

    def _on_grad(self, key: int, grad: torch.Tensor) -> None:
        if self.mode is None and not self.accumulating:
            # a backward that reaches our parameters with no compiled backward graph
            if compiled_autograd_active():
                raise RuntimeError(COMPILED_AUTOGRAD_ERROR)
            self._start_backward(torch._C._current_graph_task_id(), None)
        if not self.checking:
            return
        exp = self.expected.pop(key, None)
        if exp is None:
            self.foreign.append(key)
        elif exp.data_ptr() != grad.data_ptr():
            self.mixed.append(key)

    def _end_of_backward(self) -> None:
        mode = self.mode
        foreign, mixed, reason = self.foreign, self.mixed, self.reason
        step_norm = self.step_norm if self.step_check else None
        self._reset()
        if mode is None:
            return
        self.mode_counts[mode] += 1
        if mode == "step":
            if step_norm is not None and not foreign and not mixed:
                self.norm_for_step = self._handoff(*step_norm)
            return
        if mode == "off":
            self.after_accumulate = True
            return
        # a backward whose gradients did not land in .grad (torch.autograd.grad) clipped
        # nothing a compiled step will see
        if any(p.grad is not None for p in self.params.values()):
            self.clipped_since_step += 1
        after_accumulate, self.after_accumulate = self.after_accumulate, False
        problem = None
        if foreign:
            problem = (
                f"{len(foreign)} parameters received gradients that no compiled backward "
                "graph produced (a module Dynamo did not compile, or a parameter used "
                "outside the compiled region)"
            )
        elif mixed:
            problem = (
                f"{len(mixed)} parameters also received gradients from outside the compiled "
                "region (e.g. an eager loss term on the parameters)"
            )
        if mode == "fused":
            if problem is not None:
                self.fusable, self._unfusable_reason = False, problem
                raise RuntimeError(
                    "compileclip: the gradients of this backward are wrong: they were "
                    f"clipped inside the compiled graph, but {problem}. This only happens "
                    "when the model's structure changed after the first steps; later "
                    "backwards use the exact (unfused) path."
                )
            if self.config.error_if_nonfinite and not bool(torch.isfinite(self.total_norm)):
                raise nonfinite_error(self.config.norm_type)
            return
        if mode == "probe":
            if problem is None:
                self.fusable = True
            else:
                self.fusable, self._unfusable_reason = False, problem
                self.warn_once(problem)
        elif self.config.fuse and not (after_accumulate and reason == _ACCUMULATED):
            self.warn_once(reason)
        self.clip_final_grads()

    def clip_final_grads(self) -> None:
        """Eager clip_grad_norm_ over the final .grad of every known parameter."""
        params = [p for p in self.params.values() if p.grad is not None]
        if not params:
            self.total_norm = None
            return
        self.clip_(p.grad for p in params)

    def clip_(self, grads, *, unscaled: bool = False) -> None:
        """Eager clipping of ``grads`` in place: ``clip_grad_norm_`` (norm in float32; sets
        total_norm), then ``clip_grad_value_``, as configured. With a GradScaler attached and
        ``unscaled=False`` the gradients are still scaled: the norm is taken of ``g / scale``
        and the value bound is ``clip_value * scale``, so ``GradScaler.step`` sees eager's
        clipped gradients once it unscales them."""
        cfg = self.config
        grads = list(grads)
        if not grads:
            return
        scale = None
        if self.scaler is not None and not unscaled and getattr(self.scaler, "_scale", None) is not None:
            scale = self.scaler._scale
        if cfg.computes_norm:
            total = total_norm_fp32(grads, cfg.norm_type)
            if scale is not None:  # every p-norm is homogeneous: ||g / s|| = ||g|| / s
                total = total * scale.double().reciprocal().float().to(total.device)
            self.total_norm = total
            if cfg.error_if_nonfinite and not bool(torch.isfinite(total)):
                raise nonfinite_error(cfg.norm_type)
            if cfg.max_norm is not None:
                coef = torch.clamp(self.max_norm_on(total.device) / (total + _EPS), max=1.0)
                scale_grads_(grads, coef)
        if cfg.clip_value is not None:
            # with a GradScaler or the skip policy, an inf must survive the clamp for the
            # overflow check that follows (eager checks before clamping)
            keep_nonfinite = self.scaler is not None or cfg.skip_nonfinite
            if scale is None and not keep_nonfinite:
                torch._foreach_clamp_min_(grads, -cfg.clip_value)
                torch._foreach_clamp_max_(grads, cfg.clip_value)
            else:
                for g in grads:
                    bound = cfg.clip_value if scale is None else (scale * cfg.clip_value).to(g.device)
                    clamped = g.clamp(min=-bound, max=bound)
                    if keep_nonfinite:
                        clamped = torch.where(g.abs() < math.inf, clamped, g)
                    g.copy_(clamped)
