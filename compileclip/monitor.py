"""What a clip remembers of its steps, on the device: the norm history, the threshold of each
step, the per-parameter norms of the last step, and an adaptive policy's statistics.

Every clipped step ends in ``Monitor.record(total, thr)``, whichever path clipped it (a
compiled step graph, the eager clip at the step hook, a DTensor clip). ``record`` only runs
device kernels (a ring-buffer write is a ``copy_`` into a slot chosen by a host counter):
nothing here reads a tensor on the host, except ``suggest_max_norm`` and ``plot``, which are
for the user to call.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch

from . import thresholds
from .policies import AGC, Percentile, ZScore


class Monitor:
    """One group's record (``clip.monitor(opt)``; the clip's own properties read the only
    one): ``history``, ``thresholds``, ``threshold``, ``suggest_max_norm``, ``param_norms``,
    ``named_norms``, ``plot``, and ``state_dict``/``load_state_dict`` to resume."""

    def __init__(self, config) -> None:
        self.size: int | None = config.history
        mn = config.max_norm
        self.policy = mn if isinstance(mn, (Percentile, ZScore)) else None
        self.agc = mn if isinstance(mn, AGC) else None
        self.per_param: bool = config.per_param_norms
        self.title = _describe(mn)
        self.steps = 0  # steps recorded: a host counter, no sync
        self.state: list[torch.Tensor] | None = None  # the policy's statistics (thresholds.init_state)
        self.threshold: torch.Tensor | None = None  # of the last step
        self._norms: torch.Tensor | None = None  # ring buffers of ``size``
        self._thrs: torch.Tensor | None = None
        self.param_norms: torch.Tensor | None = None  # of the last step, 1-D
        self.param_refs: tuple[weakref.ref, ...] = ()  # the parameter of each entry

    # -- the policy ---------------------------------------------------------------------------
    def policy_state(self, device: torch.device) -> list[torch.Tensor]:
        if self.state is None:
            self.state = thresholds.init_state(self.policy.kind, self.policy.params, device)
        return self.state if self.state[0].device == device else [t.to(device) for t in self.state]

    def policy_threshold(self, total: torch.Tensor) -> torch.Tensor:
        """The eager side of ``compileclip::threshold``: the same function the graphs call."""
        p = self.policy
        return thresholds.threshold(p.kind, p.params, total, self.policy_state(total.device))

    # -- one step -----------------------------------------------------------------------------
    def record(self, total: torch.Tensor, thr: torch.Tensor) -> None:
        """The clip of one step is done: ``total`` was its pre-clip norm, ``thr`` its threshold."""
        if self.policy is not None:
            state = self.policy_state(total.device)
            thresholds.update_(self.policy.kind, self.policy.params, total, state)
            if state is not self.state:  # the norm came from another device this time
                for mine, new in zip(self.state, state):
                    mine.copy_(new)
        if self.size is not None:
            if self._norms is None:
                self._norms = torch.full((self.size,), math.nan, dtype=torch.float32, device=total.device)
                self._thrs = torch.full((self.size,), math.nan, dtype=torch.float32, device=total.device)
            slot = self.steps % self.size
            self._norms[slot].copy_(total)
            self._thrs[slot].copy_(thr)
        self.threshold = thr
        self.steps += 1

    def record_param_norms(self, norms: torch.Tensor, params: Sequence[weakref.ref]) -> None:
        self.param_norms = norms
        self.param_refs = tuple(params)

    def record_run_norms(self, runs, left: Sequence[torch.Tensor], left_norms: Sequence[torch.Tensor]) -> None:
        """``per_param_norms``: the backward graphs' per-gradient norms (``GraphRun.parts``)
        and the ones the step computed itself (``left_norms`` of the parameters ``left``)."""
        pieces = [r.parts for r in runs]
        refs = [ref for r in runs for ref in r.params]
        if left:
            pieces.append(torch.stack(list(left_norms)).to(pieces[0].device if pieces else left_norms[0].device))
            refs.extend(weakref.ref(p) for p in left)
        self.record_param_norms(pieces[0] if len(pieces) == 1 else torch.cat(pieces), refs)

    # -- reading it -----------------------------------------------------------------------------
    def _ordered(self, ring: torch.Tensor | None) -> torch.Tensor:
        if self.size is None:
            raise RuntimeError(
                "compileclip: this clip keeps no history: pass clip_backend(..., history=N) to "
                "keep the pre-clip norms of the last N steps on the device"
            )
        if ring is None:
            return torch.empty(0, dtype=torch.float32)
        n = min(self.steps, self.size)
        start = self.steps % self.size if self.steps > self.size else 0
        return torch.roll(ring, -start)[:n] if start else ring[:n]

    @property
    def history(self) -> torch.Tensor:
        return self._ordered(self._norms)

    @property
    def thresholds(self) -> torch.Tensor:
        return self._ordered(self._thrs)

    def suggest_max_norm(self, q: float) -> float:
        if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q!r} is not allowed: it must be a number in [0, 1]")
        h = self.history
        finite = h[torch.isfinite(h)]  # the user's call: a host read is expected here
        if finite.numel() == 0:
            raise RuntimeError(
                "compileclip: no finite norm in the history yet: suggest_max_norm needs at least "
                "one clipped step (the clip runs at opt.step())"
            )
        return float(torch.quantile(finite, q))

    def check_param_norms(self) -> None:
        if not self.per_param:
            raise RuntimeError(
                "compileclip: per-parameter norms are off: pass clip_backend(..., per_param_norms=True)"
            )
        if self.param_norms is None:
            raise RuntimeError("compileclip: no optimizer step has been clipped yet; read named_norms after opt.step()")

    def named_norms(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        self.check_param_norms()
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        index = {id(r()): i for i, r in enumerate(self.param_refs) if r() is not None}
        return {name: self.param_norms[index[id(p)]]
                for name, p in model.named_parameters() if id(p) in index}

    def plot(self, path, *, title: str | None = None) -> None:
        from .plot import plot_history

        h = self.history
        plot_history(path, h, self.thresholds, first_step=self.steps - h.numel() + 1, title=title or self.title)

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs to go on as if uninterrupted: the step count, the history
        buffers and the policy's statistics (tensors, cloned)."""
        clone = (lambda t: None if t is None else t.detach().clone())
        return {"steps": self.steps, "history": clone(self._norms), "thresholds": clone(self._thrs),
                "policy": None if self.state is None else [clone(t) for t in self.state],
                "policy_kind": None if self.policy is None else self.policy.kind}

    def load_state_dict(self, state: dict) -> None:
        kind = None if self.policy is None else self.policy.kind
        if state.get("policy_kind") != kind and state.get("policy") is not None:
            raise ValueError(f"compileclip: the state holds {state.get('policy_kind')!r} statistics, this clip's policy is {kind!r}")
        for key, ring in (("history", "_norms"), ("thresholds", "_thrs")):
            t = state.get(key)
            if t is not None and self.size is not None:
                if t.numel() != self.size:
                    raise ValueError(f"compileclip: the saved history holds {t.numel()} steps, this clip history={self.size}")
                setattr(self, ring, t.detach().clone())
        if state.get("policy") is not None and self.policy is not None:
            self.state = [t.detach().clone() for t in state["policy"]]
        self.steps = int(state.get("steps", 0))


class Monitors:
    """The monitors of one clip, one per group, keyed by the group's first optimizer, created at
    its first step. A monitor outlives its optimizer (it holds only tensors): a function that
    trains and returns the clip still reads the history."""

    def __init__(self, config) -> None:
        self.config = config
        self._entries: list[tuple[weakref.ref | None, Monitor]] = []  # (optimizer, its monitor)
        self._pending: dict | None = None  # load_state_dict before the first step

    def for_optimizer(self, opt) -> Monitor:
        """``opt``'s monitor (``None``: a step graph shared by several optimizers)."""
        for ref, mon in self._entries:
            if (ref is None and opt is None) or (ref is not None and ref() is opt and opt is not None):
                return mon
        mon = Monitor(self.config)
        self._entries.append((None if opt is None else weakref.ref(opt), mon))
        state, self._pending = self._pending, None
        if state is not None:
            mon.load_state_dict(state)
        return mon

    def get(self, opt=None) -> Monitor:
        """``opt``'s monitor, or with ``opt=None`` the only one there is (of a live optimizer,
        or else the last one)."""
        if opt is not None:
            for ref, mon in self._entries:
                if ref is not None and ref() is opt:
                    return mon
            raise KeyError(f"compileclip: this clip has not clipped a step of this {type(opt).__name__} yet")
        if not self._entries:
            return Monitor(self.config)
        live = [mon for ref, mon in self._entries if ref is None or ref() is not None]
        if len(live) > 1:
            raise RuntimeError(
                f"compileclip: this clip clipped the steps of {len(live)} groups (separately compiled "
                "models with their own optimizers), each with its own norm history and statistics: "
                "read them with clip.monitor(optimizer)"
            )
        return live[0] if live else self._entries[-1][1]

    def load(self, state: dict, opt=None) -> None:
        Monitor(self.config).load_state_dict(state)  # checks it now, not at the first step
        if opt is not None:
            self.for_optimizer(opt).load_state_dict(state)
        elif self._entries:
            self.get().load_state_dict(state)
        else:  # no step yet: the first optimizer's monitor takes it
            self._pending = state


def _describe(max_norm) -> str:
    if max_norm is None:
        return "no norm clip"
    if isinstance(max_norm, torch.Tensor):
        return "max_norm (a tensor)"
    return f"max_norm={max_norm!r}"
