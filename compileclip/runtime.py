"""Run-time state of one clip: what the backward graphs computed, and the clip at each step.

The optimizer step is the moment of truth (``compileclip.hooks`` hears every step). There the
runtime clips the gradients of that optimizer's parameters, as eager ``clip_grad_norm_`` right
before ``opt.step()`` would, by one of the paths of ``records.Path``. The norm comes from the
backward graphs where their records prove it is the norm of exactly the final ``.grad``
(``records.plan_norm``), and is computed at the step for the rest.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Sequence

import torch

from . import clipmath, hooks, identity
from .config import ClipConfig
from .monitor import Monitor, Monitors
from .policies import POLICIES
from .records import GraphRun, Path, StepRecord, choose_path, plan_norm

_MAX_RUNS = 256  # records kept between steps (a loop that never steps must not grow them)


def _invisible_writers() -> str | None:
    """Why ``.grad`` may have changed without its version counter moving, or None. c10d
    collectives (DDP's reducer, FSDP, a manual ``dist.all_reduce(p.grad)``) and
    ``GradScaler.unscale_``'s fused kernel write into gradients without bumping versions
    (measured on torch 2.13), so the backward's norm is trusted only without them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "distributed"
    f = sys._getframe(1)
    for _ in range(24):  # scaler.step(opt) -> opt.step() -> the hooks: a few frames up
        if f is None:
            break
        if isinstance(f.f_locals.get("self"), torch.amp.GradScaler):
            return "grad_scaler"
        f = f.f_back
    return None


class ClipRuntime:
    def __init__(self, config: ClipConfig, scaler=None) -> None:
        self.config = config
        self.scaler = scaler  # an enabled GradScaler, for the compiled step
        # parameters of compiled model graphs, by id (an entry goes with its parameter)
        self.params: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        # the modules of the compiled frames: their parameters as they are at a step count too
        # (FSDP2 swaps its sharded parameters back in after the forward the graph saw)
        self.modules: weakref.WeakSet = weakref.WeakSet()
        self.step_optimizers: weakref.WeakSet = weakref.WeakSet()  # steps this clip compiles
        self.failed = False  # a compile with this clip raised (hooks look for no modules of it)
        # it compiled a graph or a step, or its modules were found (hooks._discover): it
        # knows what it clips, so nobody looks for its modules again
        self.engaged = False
        self.fused_optimizers: weakref.WeakSet = weakref.WeakSet()  # compile_step refused to trace
        self.graphs = 0  # graphs this clip compiled (model and step)
        self.runs: list[GraphRun] = []  # confirmed backward norms, not yet used by a step
        self._pending: list = []  # runs of this backward, confirmed when it ends
        self._task = None
        self.open_step: StepRecord | None = None
        self.retry_clipped = False  # abort_step: the eager rerun of this step is clipped already
        self.hidden_grads: list = []  # (param, grad) of an eager step skipped as nonfinite
        self.stepped_scaler_state = None  # a GradScaler state this step unscaled: STEPPED after it
        self.total_norm: torch.Tensor | None = None
        # what each optimizer's steps left (history, a policy's statistics, per-parameter
        # norms): a GAN's two optimizers have two norm sequences, as two eager clips would
        self.monitors = Monitors(config)
        self.skipped_steps: torch.Tensor | None = None
        self.stats: Counter = Counter()
        # optimizer state that a skipped first compiled step created (step.py), removed at the
        # next step's pre-hook, before Dynamo picks the next graph by it
        self.state_drops: list[tuple[weakref.ref, dict]] = []
        self._consts: dict = {}
        self._warned: set[str] = set()

    # -- what this clip covers ------------------------------------------------------------
    def add_params(self, params) -> None:
        for p in params:
            if p.requires_grad and id(p) not in self.params:
                self.params[id(p)] = p
                hooks.changed()

    def graph_compiled(self) -> None:
        self.graphs += 1
        self.engaged = True
        hooks.changed()

    def add_step_optimizer(self, opt: torch.optim.Optimizer, fused: bool = False) -> None:
        """``opt``'s step is compiled with this clip (or, ``fused``, stepped eagerly by it)."""
        (self.fused_optimizers if fused else self.step_optimizers).add(opt)
        self.engaged = True
        hooks.changed()

    def add_modules(self, mods) -> None:
        for m in mods:
            if m not in self.modules:
                self.modules.add(m)
                self.engaged = True
                hooks.changed()

    def knows(self, opt: torch.optim.Optimizer) -> bool:
        if opt in self.step_optimizers or opt in self.fused_optimizers:
            return True
        ids = {id(p) for group in opt.param_groups for p in group["params"]}
        if any(i in self.params for i in ids):
            return True
        return any(id(p) in ids for m in list(self.modules) for p in m.parameters())

    @property
    def graphless(self) -> bool:
        return not self.failed and not self.engaged

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"compileclip: {message}", stacklevel=4)

    # -- runtime inputs of the graphs -------------------------------------------------------
    def const(self, key, value, dtype, device: torch.device) -> torch.Tensor:
        t = self._consts.get((key, device))
        if t is None:
            t = self._consts[(key, device)] = torch.tensor(value, dtype=dtype, device=device)
        return t

    def max_norm_on(self, device: torch.device) -> torch.Tensor:
        mn = self.config.max_norm
        if mn is None or isinstance(mn, POLICIES):
            return self.const("inf", math.inf, torch.float32, device)  # not read
        if isinstance(mn, torch.Tensor):  # may change in place between steps
            return mn if mn.device == device and mn.dtype == torch.float32 else mn.to(device, torch.float32)
        return self.const("max_norm", mn, torch.float32, device)

    def graph_inputs(self, device: torch.device, clip: bool, scale: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The runtime inputs the passes add, in their order: max_norm, enabled, then
        clip_value and the GradScaler's scale where configured."""
        out = [self.max_norm_on(device), self.const(("enabled", clip), clip, torch.bool, device)]
        if self.config.clip_value is not None:
            out.append(self.const("value", self.config.clip_value, torch.float32, device))
        if self.scaler is not None:
            out.append(self.scale_on(device) if scale is None else scale)
        return out

    def scale_on(self, device: torch.device) -> torch.Tensor:
        """The attached GradScaler's current scale (1 before its first ``scale()``)."""
        scale = getattr(self.scaler, "_scale", None)
        return self.const("one", 1.0, torch.float32, device) if scale is None else scale.to(device)

    def count_skipped(self, nonfinite: torch.Tensor) -> None:
        if self.skipped_steps is None:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=nonfinite.device)
        self.skipped_steps.add_(nonfinite > 0)

    # -- backward: records of the norms the graphs computed ---------------------------------
    def record_run(self, norm: torch.Tensor, params: tuple[weakref.ref, ...], ids: frozenset[int],
                   grads: Sequence[torch.Tensor], parts: torch.Tensor | None = None) -> None:
        """A backward graph returned ``norm`` for ``grads``, the gradients of the parameters
        ``params`` (weak references; ``ids``: their ids). Holding the gradients now would make
        autograd copy them instead of storing them in ``.grad``, so the run is confirmed when
        the backward ends, by address."""
        self.stats["backward_graph_runs"] += 1
        if not self.config.fuse:
            return
        # the storages, not the tensors: autograd still moves each tensor into .grad (it
        # checks the tensor's references), and while a storage lives no other tensor gets its
        # address, so a matching data_ptr at the end of the backward proves identity
        entry = (norm, params, ids, identity.storages(grads), identity.data_ptrs(grads), identity.versions(grads), parts)
        task = torch._C._current_graph_task_id()
        if task != self._task or not self._pending:
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        self._pending.append(entry)

    def _end_of_backward(self) -> None:
        pending, self._pending, self._task = self._pending, [], None
        for norm, refs, ids, _storages, ptrs, versions, parts in pending:
            params = identity.deref(refs)
            if identity.has_none(params):
                continue
            now = identity.grads(params)
            # summed with another contribution, or not stored in .grad: not this run's norm.
            # (A change in place since the graph returned shows in the version counter, which
            # the step compares with the one recorded then.)
            if identity.has_none(now) or identity.data_ptrs(now) != ptrs:
                continue
            # from here on the record holds .grad itself: identity, not an address
            self.runs.append(GraphRun(norm, refs, tuple(now), versions, ids, parts))
        del self.runs[:-_MAX_RUNS]

    @staticmethod
    def intact(run: GraphRun) -> bool:
        """Every gradient of ``run`` is still its parameter's ``.grad``, unchanged. Batched
        checks (``identity``), no Python loop per gradient."""
        params = identity.deref(run.params)
        if identity.has_none(params):
            return False
        return identity.all_identical(identity.grads(params), run.grads) and identity.versions(run.grads) == run.versions

    def plan(self, params: Sequence[torch.Tensor]) -> tuple[list[GraphRun], list[torch.Tensor]]:
        """The backward norms this step can use, and the parameters it must norm itself.
        Consumes every record that touches these parameters."""
        if not self.runs:  # no backward graph ran since (or fuse=False: none are recorded)
            return [], list(params)
        ids = identity.ids(params)
        facts = [(r.ids, self.intact(r)) for r in self.runs]
        distrust = _invisible_writers()
        used, left = plan_norm(facts, ids) if distrust is None else ([], ids)
        if distrust is not None:
            self.stats[f"norm_not_trusted_{distrust}"] += 1
        runs = [self.runs[i] for i in used]
        self.runs = [r for r, (rids, _) in zip(self.runs, facts) if rids.isdisjoint(ids)]
        return runs, ([p for p in params if id(p) in left] if left else [])

    # -- the step ---------------------------------------------------------------------------
    def begin_step(self, opt, args: tuple, kwargs: dict, compiled_frame: bool):
        """Torch's step pre-hook, for a step this clip owns. Returns new (args, kwargs) when
        the step's closure is wrapped."""
        self._run_state_drops()
        if self.retry_clipped:  # the eager rerun of a step whose clip already ran
            self.retry_clipped = False
            self.open_step = StepRecord(weakref.ref(opt), Path.EAGER, done=True)
            return None
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        path = choose_path(
            compiled_frame=compiled_frame, has_step_graph=opt in self.step_optimizers,
            closure=closure is not None, fuse=self.config.fuse,
        )
        rec = self.open_step = StepRecord(weakref.ref(opt), path)
        self.stats[f"step_{path.value}"] += 1
        if path is Path.EAGER:
            self.clip_step(opt)
            rec.done = True
        elif path is Path.IN_GRAPH:
            params = identity.step_params(opt)
            runs, left = self.plan(params)
            if runs and not left:
                rec.handed_norm = clipmath.combine([r.norm for r in runs], self.config.norm_type)
                if self.config.per_param_norms:  # the step graph's variant for it takes no parts
                    self.monitors.for_optimizer(opt).record_run_norms(runs, [], [])
        else:
            @torch._dynamo.disable  # a compiled step traces its closure: the clip stays eager
            def clip_now():
                self.clip_step(opt)
                rec.done = True

            def clipped_closure():
                with torch.enable_grad():
                    loss = closure()
                clip_now()
                return loss

            if len(args) > 1:
                return (args[0], clipped_closure, *args[2:]), kwargs
            return args, {**kwargs, "closure": clipped_closure}
        return None

    def _run_state_drops(self) -> None:
        drops, self.state_drops = self.state_drops, []
        for ref, before in drops:
            opt = ref()
            for p in list(opt.state) if opt is not None else ():
                keep = before.get(p)
                if not keep:
                    del opt.state[p]
                else:
                    for key in [k for k in opt.state[p] if k not in keep]:
                        del opt.state[p][key]

    def end_step(self, opt) -> None:
        hidden, self.hidden_grads = self.hidden_grads, []
        for p, g in hidden:
            p.grad = g
        state, self.stepped_scaler_state = self.stepped_scaler_state, None
        if state is not None:
            from torch.amp.grad_scaler import OptState

            state["stage"] = OptState.STEPPED
        rec, self.open_step = self.open_step, None
        if rec is not None and rec.path is Path.IN_GRAPH and not rec.done:
            raise RuntimeError(
                f"compileclip: the step of {type(opt).__name__} was left to the step graph this "
                "clip compiled, but that graph did not run (Dynamo ran the step eagerly, e.g. at "
                "its recompile limit), so this step used unclipped gradients. Call the step "
                "through clip.compile_step(opt), which falls back to an eager clip instead"
            )

    def abort_step(self) -> None:
        """The compiled step raised before its body ran (Dynamo's recompile limit) and will be
        run again eagerly: that run's pre-hook must not clip twice."""
        rec, self.open_step = self.open_step, None
        self.retry_clipped = rec is not None and rec.done

    def take_step(self, opt) -> tuple[bool, torch.Tensor | None]:
        """For a compiled step graph of this clip: (whether it must clip, the handed norm)."""
        rec = self.open_step
        if rec is None or rec.optimizer() is not opt:
            return True, None  # no hook told us about this step: the graph is the clip
        if rec.done:
            return False, None
        rec.done = True
        return True, rec.handed_norm

    def clip_step(self, opt) -> None:
        """The eager clip of one optimizer step, over its parameters with a gradient."""
        params = identity.step_params(opt)
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise clipmath.sparse_error(f"a parameter of {type(opt).__name__}")
        overflow = False
        if self.scaler is not None:
            from torch.amp.grad_scaler import OptState

            state = self.scaler._per_optimizer_states[id(opt)]
            if state["stage"] is OptState.STEPPED:
                raise RuntimeError(
                    "compileclip: the optimizer already stepped since the last scaler.update(); "
                    "call scaler.update() after each step (and do not call scaler.step(opt) as well)"
                )
            if state["stage"] is OptState.READY:
                # the step stands in for scaler.step(opt), as in eager's recipe: unscale_
                # (which records found_inf for scaler.update()), clip, skip on overflow (a
                # host sync, as scaler.step's), and the stage STEPPED afterwards
                self.scaler.unscale_(opt)
                overflow = bool(sum(float(v) for v in state["found_inf_per_device"].values()))
                self.stepped_scaler_state = state
        self.clip_(params, skip=overflow, opt=opt)

    def threshold_for(self, total: torch.Tensor, mon: Monitor) -> torch.Tensor:
        """This step's threshold (0-d float32 on ``total``'s device): the policy's (with the
        statistics of ``mon``), a fixed ``max_norm``, nan for AGC (no global threshold)."""
        if mon.policy is not None:
            return mon.policy_threshold(total)
        if mon.agc is not None:
            return self.const("nan", math.nan, torch.float32, total.device)
        return self.max_norm_on(total.device)

    def finish(self, total: torch.Tensor, thr: torch.Tensor, mon: Monitor) -> None:
        """The clip of one step is done (every path ends here): its norm, for the user and
        the optimizer's monitor."""
        self.total_norm = total
        mon.record(total, thr)

    def clip_(self, params: Sequence[torch.Tensor], skip: bool = False, opt=None) -> None:
        """Eager ``clip_grad_norm_`` then ``clip_grad_value_`` over ``params``' gradients; the
        optimizer then skips them when ``skip`` (or ``skip_nonfinite`` and the norm is nan/inf).
        The threshold is ``max_norm``'s or the adaptive policy's; ``AGC`` clips unit-wise."""
        cfg = self.config
        mon = self.monitors.for_optimizer(opt)
        grads = [p.grad for p in params]
        if any(clipmath.is_dtensor(g) for g in grads):
            if cfg.computes_norm:
                if mon.per_param:  # before the clip scales them
                    mon.record_param_norms(clipmath.dtensor_param_norms(grads, cfg.norm_type),
                                           [weakref.ref(p) for p in params])
                total, thr = clipmath.dtensor_clip_(
                    params, lambda t: self.threshold_for(t, mon), cfg.norm_type, cfg.error_if_nonfinite,
                    clip_norm=cfg.max_norm is not None and mon.agc is None)
                if mon.agc is not None:
                    clipmath.agc_(params, mon.agc.clipping, mon.agc.eps)
                self.finish(total, thr, mon)
                self.stats["norm_at_step"] += 1
            if cfg.clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
            return
        if cfg.computes_norm:
            runs, left = self.plan(params)
            device = grads[0].device
            norms = [r.norm for r in runs]
            left_norms = clipmath.per_tensor_norms([p.grad for p in left], cfg.norm_type, device) if left else []
            total = clipmath.combine(norms + left_norms, cfg.norm_type)
            if mon.per_param:
                mon.record_run_norms(runs, left, left_norms)
            self.stats["norm_from_backward" if not left else "norm_at_step"] += 1
            if cfg.error_if_nonfinite and not bool(torch.isfinite(total)):
                self.total_norm = total
                raise clipmath.nonfinite_error(cfg.norm_type)
            skip = skip or (cfg.skip_nonfinite and not bool(torch.isfinite(total)))
            if skip:
                self.count_skipped(torch.ones((), device=device))
            thr = self.threshold_for(total, mon)
            if mon.agc is not None:
                clipmath.agc_(params, mon.agc.clipping, mon.agc.eps)
            elif cfg.max_norm is not None:
                clipmath.scale_(grads, clipmath.coefficient(thr, total))
            self.finish(total, thr, mon)
        elif skip:
            self.count_skipped(torch.ones((), device=grads[0].device))
        if cfg.clip_value is not None:
            clipmath.clamp_values_(grads, cfg.clip_value)
        if skip:
            # .grad holds what eager's clip leaves (nan); an optimizer skips parameters without
            # a gradient, so hide them for this step: end_step gives them back
            self.hidden_grads = [(p, p.grad) for p in params]
            for p in params:
                p.grad = None
