"""One compiled graph, several modules: the leaves a graph runs with.

Dynamo reuses a compiled graph for every module whose guards it passes: two ``nn.Linear(8, 8)``
compiled with one clip, the identical blocks of regional compilation, a new model of the same
class in a sweep. The parameters are the graph's inputs (``inline_inbuilt_nn_modules``), so
the backend sees the first module's leaves only, at compile time. ``GraphLeaves`` watches the
parameters each run of the graph brings:

- a run with other parameters makes them known to the scope (with the compiled modules that
  hold them, found once, ``discover.modules_holding``), at that module's first forward: its
  optimizer's steps are then clipped over its own group, as eager's;
- the run's autograd node carries them (``metadata``) to the backward graph's recording wrapper
  (``backward.NormRecordingBackward``), which records the norms for the parameters of the run
  that made them, not for the first module's.

A run with the compile-time parameters (the usual case) costs two weak references (its first
and last parameters: 0.1 us, whatever their number); nothing is tagged.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

KEY = "compileclip_leaves"  # in the autograd node's metadata: {input index: weak reference}
_NODE = "CompiledFunctionBackward"  # AOTAutograd's autograd node of a compiled graph


class GraphLeaves:
    """The ``nn.Parameter`` leaves of one compiled graph's inputs: those it was compiled with,
    and those its runs bring."""

    def __init__(self, rt, leaf_idx: dict[int, torch.Tensor]) -> None:
        # weakly: Dynamo and AOTAutograd may keep a compiled forward past torch._dynamo.reset(),
        # and a runtime kept alive keeps its DDP hook from the next clip of a sweep
        self.rt = weakref.ref(rt)
        # plain tensors that require grad (an input, FGSM) change every run: not a module's
        self.idx = tuple(i for i, t in leaf_idx.items() if isinstance(t, torch.nn.Parameter))
        # a module is told by its first and last parameters (the same cost for any number;
        # one with other parameters in between still has its module's parameters at the step)
        self._ends = (self.idx[0], self.idx[-1]) if self.idx else None
        self._compiled = self._key(leaf_idx) if self.idx else None
        self._seen: dict[tuple[int, int], tuple] = {}  # ids of the ends -> (ends' refs, {input index: ref})
        self.multi = False  # some run brought other parameters: the backward looks at its node

    def _key(self, args) -> tuple:
        a, b = self._ends
        return weakref.ref(args[a]), weakref.ref(args[b])

    def observe(self, args) -> dict[int, weakref.ref] | None:
        """A run's inputs: None if its parameters are the compile-time ones, else theirs
        ({input index: weak reference}), made known to the scope the first time."""
        if self._ends is None:
            return None
        first, last = args[self._ends[0]], args[self._ends[1]]
        if self._compiled[0]() is first and self._compiled[1]() is last:
            return None
        seen = self._seen.get((id(first), id(last)))
        if seen is None or seen[0][0]() is not first or seen[0][1]() is not last:
            seen = self._seen[(id(first), id(last))] = (self._key(args), self._learn([args[i] for i in self.idx]))
        return seen[1]

    def _learn(self, got) -> dict[int, weakref.ref]:
        from . import discover

        self.multi = True
        rt = self.rt()
        if rt is not None:
            rt.scope.add_graph(discover.modules_holding(rt, got), got)
        return dict(zip(self.idx, map(weakref.ref, got)))


class WatchedForward:
    """A compiled forward graph, called with ``*args`` as Dynamo calls a backend's callable:
    ``GraphLeaves.observe`` first, then the run's autograd node tagged where its parameters are
    not the compile-time ones."""

    def __init__(self, compiled, leaves: GraphLeaves) -> None:
        self.compiled = compiled
        self.leaves = leaves

    def __call__(self, *args: Any) -> Any:
        refs = self.leaves.observe(args)
        out = self.compiled(*args)
        if refs is not None:
            tag(out, refs)
        return out


def tag(out, refs: dict[int, weakref.ref]) -> None:
    """Put ``refs`` on the autograd node of the compiled graph that returned ``out`` (an
    output's own node, or the one under an output that is a view of another)."""
    for t in out if isinstance(out, (list, tuple)) else (out,):
        fn = t.grad_fn if isinstance(t, torch.Tensor) else None
        if fn is None:
            continue
        node = fn if type(fn).__name__ == _NODE else next(
            (n for n, _ in fn.next_functions if n is not None and type(n).__name__ == _NODE), None)
        if node is not None:
            node.metadata[KEY] = refs
            return


def run_leaves() -> dict[int, weakref.ref] | None:
    """In a compiled backward: the parameters of the forward run it differentiates, where they
    were not the compile-time ones (``tag``)."""
    node = torch._C._current_autograd_node()
    return node.metadata.get(KEY) if node is not None else None
