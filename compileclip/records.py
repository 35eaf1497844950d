"""Plain records of what happened, and the pure decisions taken from them.

Eager PyTorch clips right before ``opt.step()``: over every gradient that step will use, after
everything that writes ``.grad`` has happened. compileclip takes its decisions at the same
moment, from two kinds of record:

- ``GraphRun``: one run of a compiled backward graph. It computed the norm of the gradients it
  produced, and remembers which tensors those were (weakly) and their version counters.
- ``StepRecord``: one optimizer step. Opened by torch's global step pre-hook, closed by the
  post-hook; it says which ``Path`` clips that step.

Nothing here touches tensors or torch state: the functions take facts (ids, flags) and return
decisions, so that they can be tested as a table (``tests/test_decisions.py``).
"""

from __future__ import annotations

import dataclasses
import enum
import weakref
from collections.abc import Sequence

import torch


class Path(enum.Enum):
    """Who clips one optimizer step."""

    IN_GRAPH = "in_graph"  # the step graph this clip compiled: the scale folds into the update
    EAGER = "eager"  # before the optimizer runs: norm, then one _foreach_mul_ per device
    AFTER_CLOSURE = "after_closure"  # step(closure): after the closure's backward returns


@dataclasses.dataclass(frozen=True)
class GraphRun:
    """One run of a compiled backward graph: the norm of the gradients it produced.

    Per gradient, in the same order: ``params``, a weak reference to the parameter;
    ``grads``, the tensor the graph returned, which autograd stored as that parameter's
    ``.grad``; ``versions``, that tensor's version counter when the graph returned it. The
    norm stands for a parameter's ``.grad`` only while ``.grad`` is that very tensor,
    unchanged (see ``ClipRuntime.intact``). ``ids``: the parameters' ids."""

    norm: torch.Tensor
    params: tuple[weakref.ref, ...]
    grads: tuple[torch.Tensor, ...]
    versions: list[int]
    ids: frozenset[int]
    parts: torch.Tensor | None = None  # per_param_norms: each gradient's norm, in ``params``' order


@dataclasses.dataclass
class StepRecord:
    """One optimizer step, from the pre-hook to the post-hook."""

    optimizer: weakref.ref
    path: Path
    # the norm handed to a compiled step (all of its gradients covered by backward graphs)
    handed_norm: torch.Tensor | None = None
    done: bool = False  # the clip was applied (by the hook, the closure, or the step graph)
    graphless_owner: bool = False  # the clip had compiled no graph when the step began


def choose_path(*, compiled_frame: bool, has_step_graph: bool, closure: bool, fuse: bool) -> Path:
    """Who clips this step.

    ``compiled_frame``: the step was called from code Dynamo compiled (a trace-time constant
    of the pre-hook). ``has_step_graph``: this clip compiles this optimizer's step (the step
    graph then holds the clip). A closure runs the backward inside the step, so the clip
    waits for it, whatever else holds.
    """
    if closure:
        return Path.AFTER_CLOSURE
    if compiled_frame and has_step_graph and fuse:
        return Path.IN_GRAPH
    return Path.EAGER


def resolve_owner(strong: Sequence[object]) -> tuple[object | None, str | None]:
    """Which clip clips an optimizer's step: (owner, error). ``strong``: the clips that know
    this optimizer (its step was compiled with them) or one of its parameters (from a
    compiled graph, or a module compiled with the clip). Two would clip the same gradients
    twice."""
    if len(strong) > 1:
        return None, (
            f"{len(strong)} clip backends cover the parameters of this optimizer (one compiled "
            "the model, another the step?). Each would clip the same gradients: use one clip "
            "object for the model and the step"
        )
    return (strong[0] if strong else None), None


def plan_norm(
    runs: Sequence[tuple[frozenset[int], bool]], step_ids: frozenset[int]
) -> tuple[list[int], frozenset[int]]:
    """Which backward norms a step can use, and which gradients it must norm itself.

    ``runs``: per ``GraphRun``, the ids of its parameters and whether all its gradients are
    still the ``.grad`` of those parameters, unchanged. A run is used
    when it is intact, lies inside the step's parameters and overlaps no other candidate (a
    parameter whose gradient two runs claim is summed from both, so neither norm is its
    norm). Returns the indices of the used runs and the ids left to norm at the step.
    """
    candidates = [i for i, (ids, ok) in enumerate(runs) if ok and ids and ids <= step_ids]
    clash: set[int] = set()
    for k, i in enumerate(candidates):  # pairwise: few graphs, each with many parameters
        for j in candidates[k + 1:]:
            if not runs[i][0].isdisjoint(runs[j][0]):
                clash.update((i, j))
    used = [i for i in candidates if i not in clash]
    covered = frozenset().union(*(runs[i][0] for i in used)) if used else frozenset()
    return used, step_ids - covered
