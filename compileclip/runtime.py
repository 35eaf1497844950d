"""Run-time state of one clip, and the carrying out of step plans.

Two kinds of event reach it:

- **A backward graph ran** (``record_run``, from ``backward.NormRecordingBackward``): the norm of
  each gradient it produced. Confirmed at the end of the backward (``_end_of_backward``) if the
  gradients were stored in ``.grad`` as returned; dropped when a new backward starts or a step
  consumes them (``records.py``).
- **An optimizer step** (``begin_step``/``end_step``, from ``hooks.py``): the facts of the step
  go to ``plan.plan_step``; the plan is carried out here (eager clip: ``eager.py``) or by the
  compiled step graph (``graph_call``/``graph_done``, from ``step.py``). ``OpenStep`` is the
  record of the step in progress; after a clip the group's gradients are marked, so that a later
  step of the same group in the same backward finds them clipped.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
import weakref
from collections import Counter

import torch

from . import discover, eager, hooks, identity
from . import scope as scope_mod
from .config import ClipConfig
from .monitor import Monitor, Monitors
from .plan import Action, Clipped, StepFacts, StepPlan, plan_step
from .policies import POLICIES
from .records import BackwardRun, Sources, resolve
from .scope import Group, Scope

_is_sparse = operator.attrgetter("is_sparse")
_STAT = {a: f"step_{a.value}" for a in Action}  # the counter of each action
_FLOAT64 = (torch.float64, torch.complex128)
_MAX_RUNS = 256  # records kept between steps (a loop that never steps must not grow them)


@dataclasses.dataclass
class OpenStep:
    """One optimizer step, from the pre-hook to the post-hook."""

    optimizer: weakref.ref
    plan: StepPlan
    group: Group
    handed: torch.Tensor | None = None  # IN_GRAPH: the group's norm, handed to the step graph
    clipped: bool = False  # the clip was applied (by the hook, the closure, or the step graph)
    hidden: list = dataclasses.field(default_factory=list)  # (param, grad) of a skipped step
    scaler_state: dict | None = None  # a GradScaler state this step unscaled: STEPPED after it
    skipped: torch.Tensor | bool = False
    attrs_before: dict = dataclasses.field(default_factory=dict)  # fold: grad_scale/found_inf before it
    state_before: dict | None = None  # kernel_skip on a first step: the state before it (to drop it)
    backward_norms: bool = False  # EAGER: every norm came from the backward's records
    # read at the pre-hook, for the clip that follows it (a closure's backward renews them)
    params: list | None = None  # the group's parameters with a .grad
    grads: list | None = None  # ... and those gradients
    sources: Sources | None = None  # where their norms come from (an IN_GRAPH candidate's)


@dataclasses.dataclass
class Marks:
    """A group's gradients after its last clip in this backward: id(param) -> (weak reference
    to its gradient, version); the group's members then; the optimizers that consumed them; the
    skip flag."""

    grads: dict[int, tuple[weakref.ref, int]]
    members: frozenset[int]
    consumers: set[int]
    skipped: torch.Tensor | bool = False


class ClipRuntime:
    def __init__(self, config: ClipConfig, scaler=None) -> None:
        self.config = config
        self.scaler = scaler  # an enabled GradScaler
        self.scope = Scope()
        self.monitors = Monitors(config)
        self.stats: Counter = Counter()
        self.graphs = 0  # graphs this clip compiled (model and step)
        self.failed = False  # a compile with this clip raised
        self.graph_ready: weakref.WeakSet = weakref.WeakSet()  # optimizers whose clipped step graph ran
        self.runs: list[BackwardRun] = []  # confirmed backward norms, not yet used by a step
        self._pending: list = []  # runs of this backward, confirmed when it ends
        self._task = None
        # the parameters whose gradients backward graphs of this clip produced since the last
        # optimizer step (of any optimizer), accumulated or not: (hooks.steps() then, id -> ref)
        self._produced: tuple[int, dict[int, weakref.ref]] = (-1, {})
        self.open: OpenStep | None = None
        self.nested = 0
        self.marks: dict[int, Marks] = {}  # id(group key) -> its last clip in this backward
        self.total_norm: torch.Tensor | None = None
        self.skipped_steps: torch.Tensor | None = None
        self.state_drops: list[tuple[weakref.ref, dict]] = []  # step.py: state of a skipped first step
        self._consts: dict = {}
        self._warned: set[str] = set()

    def graph_compiled(self) -> None:
        self.graphs += 1

    def compile_failed(self) -> None:
        self.failed = True
        scope_mod.bump()  # the owners of optimizers are decided again

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"compileclip: {message}", stacklevel=4)

    # -- runtime inputs ----------------------------------------------------------------------
    def const(self, key, value, dtype, device: torch.device) -> torch.Tensor:
        t = self._consts.get((key, device))
        if t is None:
            t = self._consts[(key, device)] = torch.tensor(value, dtype=dtype, device=device)
        return t

    def max_norm_on(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``max_norm`` as a 0-d tensor in the total norm's dtype (float64 ones: unrounded)."""
        mn = self.config.max_norm
        if mn is None or isinstance(mn, POLICIES):
            return self.const("inf", math.inf, torch.float32, device)  # not read
        if isinstance(mn, torch.Tensor):  # may change in place between steps
            return mn if mn.device == device and mn.dtype == dtype else mn.to(device, dtype)
        return self.const(("max_norm", dtype), mn, dtype, device)

    def scale_on(self, device: torch.device) -> torch.Tensor:
        """The attached GradScaler's current scale (1 before its first ``scale()``)."""
        scale = getattr(self.scaler, "_scale", None)
        return self.const("one", 1.0, torch.float32, device) if scale is None else scale.to(device)

    def count_skipped(self, nonfinite: torch.Tensor) -> None:
        if self.skipped_steps is None:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=nonfinite.device)
        self.skipped_steps.add_(nonfinite > 0)

    def monitor(self, group: Group) -> Monitor:
        return self.monitors.for_optimizer(group.key)

    def finish(self, total: torch.Tensor, thr: torch.Tensor, mon: Monitor) -> None:
        """The clip of one step is done (every path ends here): its norm, for the user and the
        group's monitor."""
        self.total_norm = total
        mon.record(total, thr)

    # -- backward: records of the norms the graphs computed ---------------------------------
    def record_run(self, pieces, params: tuple[weakref.ref, ...], grads, mixed: bool = False) -> None:
        """A backward graph returned the norms ``pieces`` for ``grads``, the gradients of
        ``params`` (weak references). Holding the gradients now would make autograd copy them
        instead of storing them in ``.grad``; the storages are held instead (while a storage
        lives no other tensor gets its address) and the run is confirmed when the backward
        ends, by address."""
        self.stats["backward_graph_runs"] += 1
        self._note_produced(params)
        task = torch._C._current_graph_task_id()
        if task != self._task or not self._pending:
            if task != self._task:  # a new backward: what earlier ones left is stale
                self.new_backward()
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        self._pending.append((tuple(pieces), params, identity.storages(grads), identity.data_ptrs(grads),
                              tuple(identity.versions(grads)), mixed))

    def _end_of_backward(self) -> None:
        pending, self._pending, self._task = self._pending, [], None
        for pieces, refs, _storages, ptrs, versions, mixed in pending:
            params = identity.deref(refs)
            if identity.has_none(params):
                continue
            now = identity.grads(params)
            # summed with another contribution, or not stored in .grad: not this run's norm
            if identity.has_none(now) or identity.data_ptrs(now) != ptrs:
                continue
            self.runs.append(BackwardRun(pieces, refs, tuple(now), versions, hooks.steps(), mixed=mixed))
        del self.runs[:-_MAX_RUNS]

    def _note_produced(self, params: tuple[weakref.ref, ...]) -> None:
        at, produced = self._produced
        if at != hooks.steps():
            produced = {}
            self._produced = (hooks.steps(), produced)
        for r in params:
            p = r()
            if isinstance(p, torch.nn.Parameter):  # not an input that requires grad (FGSM)
                produced[id(p)] = r

    def new_backward(self) -> None:
        """A backward began: the records and marks of earlier ones are stale."""
        self.runs.clear()
        self.marks.clear()

    def add_run(self, run: BackwardRun) -> None:
        """A run confirmed elsewhere (DDP's hook, ``ddp.py``)."""
        self._note_produced(run.params)
        self.runs.append(run)
        del self.runs[:-_MAX_RUNS]

    def usable_runs(self) -> list[BackwardRun]:
        """The runs whose norms a step may use. Under torch.distributed a graph's norms are of the
        local gradients, which collectives then overwrite without moving a version counter
        (DDP's reducer, FSDP, ``dist.all_reduce(p.grad)``): only norms taken after DDP's
        all-reduce hold there."""
        if self.runs and torch.distributed.is_available() and torch.distributed.is_initialized():
            return [r for r in self.runs if r.collective]
        return self.runs

    def pending(self) -> set[int]:
        """The ids of the parameters with a ``.grad`` to which a backward graph of this clip
        contributed since the last optimizer step (this step is the first): summed into
        an earlier backward's gradient (accumulation) or not."""
        at, produced = self._produced
        if at != hooks.steps() - 1:
            return set()
        return {i for i, r in produced.items() if (p := r()) is not None and p.grad is not None}

    def consumed_by_known(self, ids: set[int]) -> bool:
        """A known optimizer of this clip holds one of these parameters."""
        opts = [r() for r in self.scope.optimizers]
        return any(id(p) in ids for o in opts if o is not None for g in o.param_groups for p in g["params"])

    def consume_runs(self, ids: set[int] | frozenset[int]) -> None:
        if self.runs:
            self.runs = [r for r in self.runs if ids.isdisjoint(r.ids)]

    # -- the step ------------------------------------------------------------------------------
    def begin_step(self, opt, args: tuple, kwargs: dict, compiled_frame: bool, scaler_called: bool | None = None):
        """Torch's step pre-hook, for a step of an optimizer this clip owns. Returns new
        (args, kwargs) when the step's closure is wrapped."""
        outer = self.open.optimizer() if self.open is not None else None
        if self.open is not None and not (outer is not None and outer is not opt and scope_mod.is_wrapper(outer)):
            # an open step this one cannot nest in (only a live wrapper holds another): it raised
            # (no post-hook). Closed, or every later step would pass for a nested one, unclipped;
            # its optimizer's attributes restored (a fold's grad_scale); no marks (a later backward's)
            stale, self.open, self.nested = self.open, None, 0
            stale_opt = stale.optimizer()
            if stale_opt is not None:
                eager.unfold(self, stale, stale_opt)
            name = type(stale_opt).__name__ if stale_opt is not None else "optimizer"
            self.warn_once("step_raised", f"an earlier {name}.step() raised before it finished; this step is "
                           "clipped as usual")
        if self.open is not None:
            self.nested += 1
            return None
        eager.run_state_drops(self)
        self.scope.check_layouts()
        self.scope.know(opt)
        group = self.scope.group(opt)
        if discover.complete_group(self, group):  # the group's other optimizers, found once
            group = self.scope.group(opt)
        if not self._produced[1].keys() <= group.members and opt not in self.scope.attached:
            hooks.unconsumed_error(self, opt, group)  # may find optimizers: the group anew
            group = self.scope.group(opt)
        facts, (params, grads), sources = self.facts(opt, group, args, kwargs, compiled_frame, scaler_called)
        plan = plan_step(facts)
        if plan.action is Action.RAISE:
            raise RuntimeError(plan.error)
        self.open = step = OpenStep(weakref.ref(opt), plan, group, params=params, grads=grads, sources=sources)
        self.stats[_STAT[plan.action]] += 1
        try:
            return eager.carry_out(self, step, opt, args, kwargs)
        except BaseException:  # the step does not happen: no post-hook will close it
            self.open = None
            raise
        finally:
            # read by the clip above only: a step that raises later keeps no gradient alive
            if step.plan.action is not Action.AFTER_CLOSURE:
                step.grads = step.sources = None

    def facts(self, opt, group: Group, args: tuple, kwargs: dict, compiled_frame: bool,
              scaler_called: bool | None = None):
        """The step's ``StepFacts``, the group's parameters with a ``.grad``, and (for a step
        the compiled graph may clip) where their norms come from."""
        cfg = self.config
        params, grads = identity.with_grads(group.params)
        own = params if group.is_exactly(opt) else identity.step_params(opt)
        clipped, grew = self.clipped_state(opt, own, self.marks.get(id(group.key)))
        # the records, checked once for the step (the plan asks whether they cover it, the clip
        # then takes their norms)
        ids = group.ids if len(params) == len(group.params) else None  # (all have a .grad)
        sources = resolve(self.usable_runs(), params, grads, ids) if self.runs and params else None
        ready = opt in self.graph_ready
        closure = (args[1] if len(args) > 1 else kwargs.get("closure")) is not None
        stage, fused = None, eager.fused_kernel(opt)
        if self.scaler is not None:
            stage = self.scaler._per_optimizer_states[id(opt)]["stage"].name
        return StepFacts(
            grads=len(params), excluded=group.explicit and not group.params,
            clipped=clipped, group_grew=grew,
            closure=closure,
            compiled_frame=compiled_frame, graph_ready=ready,
            group_is_step=own is params or identity.ids(params) == identity.ids(own),
            # a graph's gradient is dense: only those the records do not cover are looked at
            sparse=not (sources is not None and sources.whole is not None) and any(map(_is_sparse, grads)),
            dtensor=any(map(eager.is_dtensor, grads[:1])),
            fuse=cfg.fuse, computes_norm=cfg.computes_norm,
            # only records need trust
            trusted=eager.trusted(self, scaler_called) if self.runs or closure else True,
            backward_covers_step=compiled_frame and ready and sources is not None and sources.covered,
            scaler_stage=stage, grad_scale_set=getattr(opt, "grad_scale", None) is not None,
            skip_nonfinite=cfg.skip_nonfinite, error_if_nonfinite=cfg.error_if_nonfinite,
            fused_kernel=fused, float64=fused and any(g.dtype in _FLOAT64 for g in grads),
            scale_only=cfg.max_norm is not None and cfg.clip_value is None and self.monitor(group).agc is None,
            optimizer=type(opt).__name__,
            scope=self.scope.describe(group.units) if clipped is Clipped.MIXED else "",  # for its message
        ), (params, grads), sources

    @staticmethod
    def clipped_state(opt, own: list, marks: Marks | None) -> tuple[Clipped, bool]:
        if marks is None or not own or id(opt) in marks.consumers:  # a second step: not this backward's
            return Clipped.NONE, False
        same = identity.tagged(list(map(marks.grads.get, map(id, own))), identity.grads(own))
        if all(same):
            return Clipped.ALL, False
        if any(same) and all(id(p) not in marks.members for p, s in zip(own, same) if not s):
            return Clipped.MIXED, True
        return Clipped.NONE, False

    def mark_clipped(self, step: OpenStep, opt) -> None:
        """After a clip: the group's gradients as they are now, for the group's later steps."""
        params = step.params
        grads = identity.grads(params) if params is not None else None
        if grads is None or identity.has_none(grads):  # (a step may set a .grad to None)
            params, grads = identity.with_grads(step.group.params if params is None else params)
        self.marks[id(step.group.key)] = Marks(dict(zip(map(id, params), identity.tags(grads))),
                                               step.group.members, {id(opt)}, step.skipped)

    def end_step(self, opt) -> None:
        if self.nested:
            self.nested -= 1
            return
        step, self.open = self.open, None
        if step is None:
            return
        eager.unfold(self, step, opt)
        for p, g in step.hidden:
            p.grad = g
        if step.scaler_state is not None:
            from torch.amp.grad_scaler import OptState

            step.scaler_state["stage"] = OptState.STEPPED
        if step.plan.action is Action.IN_GRAPH and not step.clipped:
            raise RuntimeError(
                f"compileclip: the step of {type(opt).__name__} was left to the step graph this "
                "clip compiled, but that graph did not run (Dynamo ran the step eagerly, e.g. at "
                "its recompile limit), so this step used unclipped gradients. Call the step "
                "through clip.compile_step(opt), which falls back to an eager clip instead")
        if step.clipped:
            self.mark_clipped(step, opt)
        elif step.plan.action is Action.ALREADY:
            self.marks[id(step.group.key)].consumers.add(id(opt))

    def abort_step(self, opt, replanned: bool = False) -> None:
        """The step raised (``CompiledStep``: Dynamo's recompile limit, before the step's body
        ran, then ``replanned``: the step runs again eagerly, planned anew, and its first plan
        is not counted): a clip already applied is marked, so that a rerun does not clip twice."""
        step, self.open, self.nested = self.open, None, 0
        if step is not None and replanned:
            self.stats[_STAT[step.plan.action]] -= 1
        if step is not None:
            eager.unfold(self, step, opt)
        if step is not None and step.clipped:
            self.mark_clipped(step, opt)
            self.marks[id(step.group.key)].consumers.discard(id(opt))

    # -- the compiled step graph's side of IN_GRAPH ---------------------------------------------
    def graph_done(self, opt, clipped: bool, total, thr, nonfinite, guarded: bool, state_before=None) -> None:
        """A compiled step graph returned: its norm (when it clipped), its nonfinite flag (a
        skipped step: counted; optimizer state its first step created is dropped at the next
        pre-hook, as eager would never have created it)."""
        if state_before is not None and bool(nonfinite):
            # one host read, on the graph's first step only (later steps run another graph)
            self.state_drops.append((weakref.ref(opt), state_before))
        if clipped and self.config.computes_norm:
            step = self.open
            group = step.group if step is not None and step.optimizer() is opt else None
            mon = (self.monitor(group or self.scope.group(opt)) if opt is not None
                   else self.monitors.for_optimizer(None))
            self.finish(total, eager.threshold_for(self, total, mon) if thr is None else thr, mon)
        if guarded:
            self.count_skipped(nonfinite)
            if self.open is not None:
                self.open.skipped = nonfinite

    def graph_call(self, opt) -> tuple[bool, torch.Tensor | None]:
        """For a compiled step graph of this clip: (whether it clips, the handed norm)."""
        if opt is not None:
            self.graph_ready.add(opt)
        step = self.open
        if step is None or step.optimizer() is not opt:
            # no plan: the pre-hook did not know the optimizer yet (its step's first call, with
            # no model compiled by this clip); the graph is the clip, over its own gradients
            self.stats["step_in_graph"] += 1
            return True, None
        if step.plan.action is not Action.IN_GRAPH or step.clipped:
            return False, None
        step.clipped = True
        return True, step.handed
