"""Records of the backward graphs' norms, and which of them a step may use.

A ``BackwardRun`` is one run of a compiled backward graph: the norm of each gradient it
produced, and which tensors those gradients were. Its norm stands for a parameter's ``.grad``
only while ``.grad`` is that very tensor with an unchanged version counter: a second backward
(accumulation), an eager loss term on the same parameters, FSDP2's reduce-scatter or a user's
in-place edit all break that. Writers that move no version counter are the step plan's
business: ``GradScaler.unscale_``'s kernel (``plan.StepFacts.trusted``) and c10d collectives
(under torch.distributed only the norms DDP's hook took after its all-reduce are used:
``ClipRuntime.usable_runs``).

``assign_norms`` is the pure decision: which parameter's norm comes from which run.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
import weakref
from collections.abc import Sequence

import torch

from . import clipmath, identity


@dataclasses.dataclass(frozen=True)
class BackwardRun:
    """``pieces``: the 1-D float32 norms the graph returned (one per device and dtype), whose
    concatenation holds the norm of ``params[k]``'s gradient at ``k``; ``grads``: the tensors
    autograd stored as those ``.grad``; ``versions``: their version counters then."""

    pieces: tuple[torch.Tensor, ...]
    params: tuple[weakref.ref, ...]
    grads: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    steps: int = 0  # optimizer steps begun in the process before this run (hooks.steps)
    collective: bool = False  # taken after the all-reduce (DDP's hook, ``ddp.py``), not by a graph
    ids: tuple[int, ...] = ()  # id of each parameter (filled in: the parameters live now)
    mixed: bool = False  # one piece joined from several (device, dtype) groups' pieces

    def __post_init__(self) -> None:
        if not self.ids:
            object.__setattr__(self, "ids", tuple(map(id, identity.deref(self.params))))

    def all_intact(self, now: Sequence[torch.Tensor] | None = None) -> bool:
        """``all(self.intact())``, with no list per gradient. ``now``: the parameters' ``.grad``
        in this run's order, if the caller has them."""
        if now is None:
            params = identity.deref(self.params)
            if identity.has_none(params):
                return False
            now = identity.grads(params)
        return all(map(operator.is_, now, self.grads)) and tuple(identity.versions(self.grads)) == self.versions

    def intact(self) -> list[bool]:
        """Per gradient: still its parameter's ``.grad``, unchanged (batched checks)."""
        params = identity.deref(self.params)
        now = [None if p is None else p.grad for p in params]
        same = list(map(operator.is_, now, self.grads))
        vers = identity.versions(self.grads)
        return [s and v == w for s, v, w in zip(same, vers, self.versions)]

    def changed_in_place(self) -> list[bool]:
        """Per gradient: still its parameter's ``.grad``, but written in place since."""
        params = identity.deref(self.params)
        now = [None if p is None else p.grad for p in params]
        vers = identity.versions(self.grads)
        return [n is g and v != w for n, g, v, w in zip(now, self.grads, vers, self.versions)]


class Sources(typing.NamedTuple):
    """Where the norms of a step's gradients come from, decided once per step (the plan asks
    whether they are covered, the clip then takes them). ``whole``: the run that holds exactly
    these gradients' norms, in this order, all intact (the usual case: one backward graph);
    otherwise ``each``: ``(run, position)`` or None per gradient (``assign_norms``). A named
    tuple: made at every step, cheaper than a frozen dataclass."""

    runs: tuple[BackwardRun, ...]
    whole: int | None = None
    each: tuple | None = None

    @property
    def uniform(self) -> bool:
        """``whole``, from one piece of one device and dtype (a graph returns one per group, and
        joins them where a leaf got no gradient: ``mixed``)."""
        run = self.runs[self.whole] if self.whole is not None else None
        return run is not None and len(run.pieces) == 1 and not run.mixed

    @property
    def covered(self) -> bool:
        return self.whole is not None or (self.each is not None and all(s is not None for s in self.each))


def resolve(runs: Sequence[BackwardRun], params: Sequence[torch.Tensor], grads: Sequence | None = None,
            ids: tuple[int, ...] | None = None) -> Sources:
    """``Sources`` of ``params``' norms among ``runs`` (their ``.grad`` as it is now, which is
    ``grads`` when given; ``ids``: their ids, if known)."""
    runs = tuple(runs)
    if not runs or not params:
        return Sources(runs, each=(None,) * len(params))
    if ids is None:
        ids = tuple(map(id, params))
    for r, run in enumerate(runs):
        if run.ids == ids and run.all_intact(grads):
            return Sources(runs, whole=r)
    entries = [list(zip(run.ids, run.intact())) for run in runs]
    return Sources(runs, each=tuple(assign_norms(entries, ids)))


def assign_norms(runs: Sequence[Sequence[tuple[int, bool]]], wanted: Sequence[int]) -> list[tuple[int, int] | None]:
    """Where the norm of each wanted parameter comes from: ``(run, position)`` of an intact
    entry, or None (computed at the step). ``runs``: per run, ``(parameter id, intact)`` per
    gradient. Two runs cannot both be intact for one parameter (only one of them returned the
    tensor that is its ``.grad``); a later run wins if that ever happens."""
    source: dict[int, tuple[int, int]] = {}
    for r, entries in enumerate(runs):
        for k, (pid, ok) in enumerate(entries):
            if ok:
                source[pid] = (r, k)
    return [source.get(pid) for pid in wanted]


def ordered_norms(runs: Sequence[BackwardRun], params: Sequence[torch.Tensor], norm_type: float,
                  inv_scale=None, trusted: bool = True, found: Sources | None = None):
    """The norm of each of ``params``' gradients (1-D float32, in ``params``' order): from the
    intact entries of ``runs`` where ``trusted``, computed now for the rest. Returns (norms,
    how many came from the backward). ``found``: ``resolve(runs, params)``, if done already."""
    device = params[0].grad.device
    if trusted and runs:
        found = found if found is not None else resolve(runs, params)
        if found.whole is not None:
            pieces = found.runs[found.whole].pieces
            if len(pieces) == 1:
                return (pieces[0] if pieces[0].device == device else pieces[0].to(device)), len(params)
            return torch.cat([p.to(device) for p in pieces]), len(params)
        runs, sources = found.runs, list(found.each)
    else:
        sources = [None] * len(params)
    left = [p.grad for p, s in zip(params, sources) if s is None]
    if not runs or len(left) == len(params):
        return clipmath.grad_norms(left, norm_type, inv_scale), 0
    used = sorted({r for s in sources if s is not None for r, _ in [s]})
    offsets, pieces, base = {}, [], 0
    for r in used:
        offsets[r] = base
        pieces.extend(runs[r].pieces)
        base += len(runs[r].params)
    if left:
        pieces.append(clipmath.grad_norms(left, norm_type, inv_scale))
    positions, k = [], base
    for s in sources:
        if s is None:
            positions.append(k)
            k += 1
        else:
            positions.append(offsets[s[0]] + s[1])
    # ``stitch`` puts element k at position positions[k]; here element i comes from positions[i]
    flat = pieces[0].to(device) if len(pieces) == 1 else torch.cat([p.to(device) for p in pieces])
    if positions != list(range(len(positions))) or len(positions) != flat.numel():
        flat = flat[torch.tensor(positions, device=device)]
    return flat, len(params) - len(left)
