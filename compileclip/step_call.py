"""The run-time side of a compiled optimizer step: what calls the compiled step graph
(``ClippedStep``), and what ``clip.compile_step(opt)`` returns (``CompiledStep``)."""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch

from torch._dynamo.exc import FailOnRecompileLimitHit

from . import eager, hooks
from .eager import is_dtensor


class ClippedStep:
    """Calls a compiled step graph with the clip's runtime inputs, by the names of its
    signature, and hands what the graph returns (the total norm, the nonfinite flag, a
    policy's threshold, per-gradient norms) to the runtime. No host sync."""

    def __init__(self, variants, runtime, optimizer, initializing: bool) -> None:
        from torch._inductor import config as inductor_config

        self.variants = variants
        self.runtime = runtime
        self.optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self.device = variants.device
        # this graph creates optimizer state (the first step): a skipped step must not keep it
        self.initializing = initializing
        self.cudagraphs = bool(inductor_config.triton.cudagraphs)  # outputs are reused buffers
        self._consts: dict[bool, dict] = {}  # clip -> the runtime inputs that are constants
        self._tails: dict[tuple[bool, bool], tuple] = {}  # (clip, given) -> ``_keep_tail``

    def _constants(self, clip: bool) -> dict:
        """``max_norm``, ``enabled``, ``clip_value`` (kept, unless ``max_norm`` is a tensor,
        which may be copied to the device at each step)."""
        values = self._consts.get(clip)
        if values is None:
            rt, dev = self.runtime, self.device
            values = {"max_norm": rt.max_norm_on(dev, self.variants.spec.norm_dtype), "enabled": rt.const(("enabled", clip), clip, torch.bool, dev),
                      "clip_value": rt.const("value", rt.config.clip_value, torch.float32, dev)
                      if rt.config.clip_value is not None else None}
            if not isinstance(rt.config.max_norm, torch.Tensor):
                self._consts[clip] = values
        return values

    def _keep_tail(self, clip: bool, given: bool, values: dict) -> None:
        """Where a step's added inputs are constants followed by the handed norm (no scaler, no
        policy state, a ``max_norm`` that is no tensor), keep them as a list: later steps skip
        ``bind`` (a few us of a step's host time)."""
        names = self.variants.signature(given).inputs
        if ((names and names[-1] == "total_norm") != given or "scale" in names or "state" in names
                or clip not in self._consts):
            return
        self._tails[(clip, given)] = tuple(values[n] for n in (names[:-1] if given else names))

    def __call__(self, *args: Any) -> Any:
        rt, dev = self.runtime, self.device
        opt = self.optimizer() if self.optimizer is not None else None
        amp_state, scale = _amp_begin(rt.scaler, opt, dev) if rt.scaler is not None else (None, None)
        clip, handed = rt.graph_call(opt)
        given = handed is not None
        if not clip and given not in self.variants.compiled and self.variants.compiled and not self.variants.guarded:
            # a step that does not clip (clipped at the pre-hook) runs whichever variant exists
            given = next(iter(self.variants.compiled))
            dtype = self.variants.spec.norm_dtype
            handed = rt.const(("zero", dtype), 0.0, dtype, dev) if given else None
        tail = self._tails.get((clip, given)) if scale is None else None
        if tail is not None:  # the usual step: constants, then the handed norm (if any)
            full = [*args, *tail, handed] if given else [*args, *tail]
        else:
            values = {**self._constants(clip), "scale": scale, "total_norm": handed}
            if self.variants.policy is not None:  # read only by the graph: updated after it, by ``finish``
                values["state"] = self._monitor(opt).policy_state(dev)
            full = self.variants.signature(given).bind(args, values)
            self._keep_tail(clip, given, values)
        compiled, sig = self.variants.get(given, full)
        state_before = {p: set(st) for p, st in opt.state.items()} if self.initializing else None
        # Dynamo calls what a backend returns with *args, whatever ``_boxed_call`` says
        outs, added = sig.split(list(compiled(*full)))
        if self.cudagraphs:
            added = {k: v.clone() for k, v in added.items()}
        nonfinite = added.get("nonfinite")
        total = added.get("total_norm", handed)
        if is_dtensor(total):  # FSDP2: replicated, the same on every rank
            total = total.full_tensor()
        if clip and "param_norms" in added:
            self._monitor(opt).record_param_norms(added["param_norms"], self.variants.grad_params)
        rt.graph_done(opt, clip, total, added.get("threshold"), nonfinite, self.variants.guarded, state_before)
        if amp_state is not None:
            from torch.amp.grad_scaler import OptState

            amp_state["found_inf_per_device"][dev] = nonfinite
            amp_state["stage"] = OptState.STEPPED
        return outs

    def _monitor(self, opt):
        rt = self.runtime
        return rt.monitors.for_optimizer(rt.scope.group(opt).key if opt is not None else None)


class EagerClipThenStep:
    """``fuse=False``: the step graph without a clip. A step the pre-hook did not plan (its first
    call, before the graph made the optimizer known) is clipped eagerly first."""

    def __init__(self, compiled, runtime, optimizer) -> None:
        self.compiled = compiled
        self.runtime = runtime
        self.optimizer = weakref.ref(optimizer) if optimizer is not None else None

    def __call__(self, *args: Any) -> Any:
        rt = self.runtime
        opt = self.optimizer() if self.optimizer is not None else None
        if rt.open is not None or opt is None:
            return self.compiled(*args)
        rt.begin_step(opt, (opt,), {}, compiled_frame=False)
        try:
            return self.compiled(*args)
        finally:
            rt.end_step(opt)


def _amp_begin(scaler, opt, device: torch.device):
    """GradScaler bookkeeping before a compiled step with a scaler attached. Returns the
    optimizer's per-optimizer state to record ``found_inf`` into (None if ``unscale_`` already
    ran: then the scaler has decided) and the scale to divide the gradients by."""
    from torch.amp.grad_scaler import OptState

    if opt is None:
        raise RuntimeError(
            "compileclip: a GradScaler is attached to this clip backend, but the compiled step's "
            "optimizer could not be identified; compile `opt.step` itself")
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError(
            "compileclip: the optimizer already stepped since the last scaler.update(); call "
            "scaler.update() after each step (and do not call scaler.step(opt) as well)")
    if state["stage"] is OptState.UNSCALED:
        # scaler.unscale_(opt) (or scaler.step(opt), which calls this step only when no inf was
        # found) already unscaled the gradients and recorded found_inf
        return None, torch.ones((), dtype=torch.float32, device=device)
    if scaler._scale is None:
        raise RuntimeError(
            "compileclip: the attached GradScaler has no scale yet: the loss must be scaled with "
            "scaler.scale(loss).backward() before the step")
    return state, scaler._scale


class CompiledStep:
    """What ``clip.compile_step(opt)`` returns: call it as ``opt.step``.

    ``compiled`` is the optimizer's own step function compiled, without torch's
    ``Optimizer.step`` wrapper: this object does the wrapper's work around it (the other step
    hooks, in torch's order, and the clip's plan), so that Dynamo compiles the update alone, in
    one frame with no graph break, and the host pays for the hooks once, in plain Python.
    Dynamo's recompile limit raises here instead of silently running the step uncompiled (and
    unclipped, where the plan left the clip to the graph); the step is then run eagerly, clipped
    by the plan. A step given a closure runs eagerly (``opt.step(closure)``): the closure's
    backward runs inside it, and the clip after it."""

    def __init__(self, optimizer, compiled, runtime, raw=None) -> None:
        self.optimizer = optimizer
        self.compiled = compiled  # None: stepped eagerly (a fused optimizer, a wrapper)
        self.runtime = runtime
        self._raw = raw  # the optimizer's step without torch's hook wrapper, bound
        # made once: a config patch is a new class and context variable per torch's patch() call
        # (~15 us a step); torch's closure patcher, which its own torch.compile(dynamic=...) uses
        # on the same path, costs less to enter and leave than a patch (~5 us a step)
        patcher = getattr(torch._dynamo.config, "_make_closure_patcher", None)
        if patcher is not None:
            self._fail_on_limit = patcher(fail_on_recompile_limit_hit=True)
        else:
            patch = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)

            def change():
                patch.__enter__()
                return lambda: patch.__exit__(None, None, None)

            self._fail_on_limit = change

    def __call__(self, *args, **kwargs):
        opt = self.optimizer
        if self.compiled is None or args or kwargs:
            return opt.step(*args, **kwargs)
        opt._opt_called = True  # what an LR scheduler's wrapper of opt.step records
        pre, post = hooks.others(opt)
        for hook in pre:
            result = hook(opt, args, kwargs)
            if result is not None:
                args, kwargs = result
        # GradScaler.step(opt) calling this object as opt.step: the frames above this one
        scaler_called = eager.called_from_grad_scaler(sys._getframe(1), eager.SCALER_FRAMES_ABOVE)
        owner, new = hooks.begin_owned(opt, args, kwargs, compiled_frame=True, scaler_called=scaler_called)
        if new is not None:
            args, kwargs = new
        try:
            out = self._call(opt, args, kwargs)
        except BaseException:
            self.runtime.abort_step(opt)  # no post-hook will close the step
            raise
        opt._optimizer_step_code()
        for hook in post:
            hook(opt, args, kwargs)
        hooks.end(opt, owner)
        return out

    def _call(self, opt, args, kwargs):
        try:
            revert = self._fail_on_limit()
            try:
                return self.compiled(*args, **kwargs)
            finally:
                revert()
        except FailOnRecompileLimitHit:
            self.runtime.abort_step(opt, replanned=True)
            self.runtime.stats["step_recompile_limit"] += 1
            hooks.begin(opt, args, kwargs, compiled_frame=False, again=True)
            return self._raw(*args, **kwargs)
