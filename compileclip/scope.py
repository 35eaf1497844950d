"""What a clip clips: its scope, and the group an optimizer step takes from it.

The scope is made of *units*: each graph the clip compiled, with the trainable leaves that
entered it and the modules of the frame Dynamo compiled (``self`` of a ``forward``: their
parameters count as they are at the step, which is how FSDP2's sharded parameters are found).
Units that share a leaf or a module are one unit: a model with graph breaks, or DDPOptimizer's
split, is one unit; regional compilation gives a unit per block; a GAN's two models compiled
separately are two units, even with one clip object.

The optimizers that step those leaves belong with them. When an optimizer steps, the clip takes
its *group*: the units whose leaves the optimizer holds, every optimizer known to hold leaves of
those units, their parameters, and so on until nothing is added. A loop with the clip equals
eager code that calls ``clip_grad_norm_(group, max_norm)`` once, right before the first step of
the group's optimizers that consumes the gradients. The group's order is eager's
``model.parameters()``: the units' module parameters first, then the other leaves, then the
optimizers' parameters; a group that no one compiled module holds (regional compilation) in
the order of the module around it.

``attach(opt, parameters)`` names a group as eager code does: ``parameters`` are clipped before
``opt``'s steps (an empty list: its steps are not clipped); ``attach(opt)`` makes ``opt`` known
before its first step.
"""

from __future__ import annotations

import itertools
import typing
import weakref
from collections.abc import Iterable

import torch


_EPOCH = [0]  # bumped with every scope's version, and by ``bump``: owners are decided again


def epoch() -> int:
    return _EPOCH[0]


def bump() -> None:
    """Something that decides which clip owns an optimizer changed (a clip came or went, a
    compile failed)."""
    _EPOCH[0] += 1


def is_wrapper(opt) -> bool:
    """Whether ``opt`` steps another optimizer it holds as an attribute
    (``ZeroRedundancyOptimizer``'s ``optim``, accelerate's ``optimizer``): that one's step runs
    inside ``opt``'s."""
    return any(isinstance(v, torch.optim.Optimizer) for v in vars(opt).values())


def _trainable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


class Unit:
    """One compiled module or function: its frame's modules and its graphs' trainable leaves."""

    def __init__(self) -> None:
        self.modules: list[weakref.ref] = []
        self.leaves: dict[int, weakref.ref] = {}

    def add(self, modules: Iterable[torch.nn.Module], leaves: Iterable[torch.Tensor]) -> None:
        known = {id(r()) for r in self.modules}
        self.modules.extend(weakref.ref(m) for m in modules if id(m) not in known)
        for t in leaves:
            self.leaves.setdefault(id(t), weakref.ref(t))

    def live_modules(self) -> list[torch.nn.Module]:
        return [m for m in (r() for r in self.modules) if m is not None]

    def params(self) -> list[torch.Tensor]:
        """Module parameters (as they are now), then the graphs' nn.Parameter leaves."""
        ps = [p for m in self.live_modules() for p in m.parameters() if p.requires_grad]
        leaves = (r() for r in self.leaves.values())
        return ps + [t for t in leaves if isinstance(t, torch.nn.Parameter) and t.requires_grad]

    def ids(self) -> set[int]:
        """Everything that makes an optimizer belong here: module parameters and all leaves
        (plain tensors that require grad as well)."""
        out = {id(p) for m in self.live_modules() for p in m.parameters()}
        out.update(i for i, r in self.leaves.items() if r() is not None)
        return out

    def describe(self) -> str:
        mods = self.live_modules()
        return type(mods[0]).__name__ if mods else f"a compiled function of {len(self.leaves)} leaves"


class Group(typing.NamedTuple):
    """The parameters one step clips (eager order), the optimizers that share them, and the
    key of the group (its first known optimizer, for its monitor). A named tuple: made at
    every step (its optimizers are cached weakly), cheaper than a frozen dataclass."""

    params: tuple[torch.Tensor, ...]
    optimizers: tuple[torch.optim.Optimizer, ...]
    key: torch.optim.Optimizer
    explicit: bool = False  # named with attach(opt, parameters=...)
    units: tuple[Unit, ...] = ()
    members: frozenset[int] = frozenset()  # id of each of ``params``
    exact: frozenset[int] = frozenset()  # id of each optimizer whose parameters are ``params``, in order
    ids: tuple[int, ...] = ()  # id of each of ``params``, in order

    def is_exactly(self, opt) -> bool:
        """``opt`` holds exactly the group's parameters, in the group's order."""
        return id(opt) in self.exact


def _opt_params(opt) -> list[torch.Tensor]:
    return list(itertools.chain.from_iterable(g["params"] for g in opt.param_groups))


def layout(opt) -> tuple:
    """What changes when an optimizer's parameters do (``add_param_group``, a list edited in
    place or replaced): each param group's list and its length. A parameter swapped for another
    at the same position of the same list goes unnoticed."""
    return tuple((id(g["params"]), len(g["params"])) for g in opt.param_groups)


def _in_model_order(params: list) -> None:
    """Sort a group that no one compiled module holds (regional compilation's blocks with the
    embedding and head) in the order of the module around it: eager's
    ``clip_grad_norm_(model.parameters())`` stacks the norms so (the total's last bits depend on
    it). Found once per change of the scope (``discover.enclosing_module``)."""
    from . import discover

    model = discover.enclosing_module(params)
    if model is not None:
        pos = {id(p): k for k, p in enumerate(model.parameters())}
        params.sort(key=lambda p: pos.get(id(p), len(pos)))


class Scope:
    def __init__(self) -> None:
        self.units: list[Unit] = []
        self.optimizers: list[weakref.ref] = []  # known optimizers, in the order they became known
        self._known: dict[int, weakref.ref] = {}  # id(known optimizer) -> its reference
        self.explicit: dict[int, tuple[weakref.ref, tuple[weakref.ref, ...]]] = {}
        self._version = 0  # ``version``
        self._layouts: dict[int, tuple] = {}  # id(known optimizer) -> its layout when last seen
        self.attached: weakref.WeakSet = weakref.WeakSet()  # optimizers given to ``attach``: their group is named
        self._groups: dict[int, tuple] = {}  # id(opt) -> (version, ref, group without optimizers, their refs)

    @property
    def version(self) -> int:
        """Bumped by every change: cached groups and owners are decided again."""
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        self._version = value
        bump()

    # -- learning -------------------------------------------------------------------------------
    def add_graph(self, modules: Iterable[torch.nn.Module], leaves: Iterable[torch.Tensor]) -> None:
        """A compiled graph: the modules of its frame and its trainable leaves join a unit."""
        modules = [m for m in modules if isinstance(m, torch.nn.Module)]
        leaves = [t for t in leaves if _trainable(t)]
        ids = {id(m) for m in modules} | {id(t) for t in leaves}
        ids |= {id(p) for m in modules for p in m.parameters()}
        merged = [u for u in self.units if ids & (u.ids() | {id(r()) for r in u.modules})]
        unit = merged[0] if merged else Unit()
        for other in merged[1:]:
            unit.add(other.live_modules(), [r() for r in other.leaves.values() if r() is not None])
            self.units.remove(other)
        before = (len(unit.modules), len(unit.leaves))
        unit.add(modules, leaves)
        if not merged:
            self.units.append(unit)
        if not merged or len(merged) > 1 or before != (len(unit.modules), len(unit.leaves)):
            self.version += 1

    def know(self, opt: torch.optim.Optimizer) -> None:
        known = self._known.get(id(opt))
        if known is not None and known() is opt:  # at every step: no walk over the optimizers
            return
        if not any(r() is opt for r in self.optimizers):
            self.optimizers.append(weakref.ref(opt))
            # dropped with the optimizer (before another object can take its id)
            self._known[id(opt)] = weakref.ref(opt, lambda _, key=id(opt), known=self._known: known.pop(key, None))
            self._layouts[id(opt)] = layout(opt)
            self.version += 1

    def check_layouts(self) -> None:
        """A known optimizer's parameters changed since (``opt.add_param_group``: progressive
        unfreezing, a head added later): the groups are decided again. Once per step."""
        for r in self.optimizers:
            o = r()
            if o is not None:
                now = layout(o)
                if self._layouts.get(id(o)) != now:
                    self._layouts[id(o)] = now
                    self.version += 1

    def attach(self, opt: torch.optim.Optimizer, parameters: Iterable[torch.Tensor] | None) -> None:
        self.know(opt)
        self.attached.add(opt)
        if parameters is not None:
            self.explicit[id(opt)] = (weakref.ref(opt), tuple(weakref.ref(p) for p in parameters))
            self.version += 1

    def detach(self, opt: torch.optim.Optimizer) -> None:
        self.optimizers = [r for r in self.optimizers if r() is not None and r() is not opt]
        self._known.pop(id(opt), None)
        self.explicit.pop(id(opt), None)
        self._layouts.pop(id(opt), None)
        self.attached.discard(opt)
        self.version += 1

    # -- asking ---------------------------------------------------------------------------------
    def knows(self, opt) -> bool:
        return any(r() is opt for r in self.optimizers)

    def claims(self, opt) -> bool:
        """``opt`` is this clip's: known (attached, compiled step, stepped before) or holding a
        leaf of a unit."""
        if self.knows(opt):
            return True
        ids = {id(p) for p in _opt_params(opt)}
        return any(ids & u.ids() for u in self.units)

    def group(self, opt: torch.optim.Optimizer) -> Group:
        """``opt``'s group (module docstring), cached until the scope changes. The cache holds
        the group's parameters (most of which ``opt`` holds anyway) while ``opt`` lives: no
        walk over weak references at each step."""
        cached = self._groups.get(id(opt))
        if cached is not None and cached[0] == self.version and cached[1]() is opt:
            opts = tuple(r() for r in cached[3])  # weakly: a cached group keeps no optimizer alive
            if not any(o is None for o in opts):
                g = cached[2]
                return Group(g.params, opts, opts[0], g.explicit, g.units, g.members, g.exact, g.ids)
        g = self._decide(opt)
        ids = tuple(map(id, g.params))
        exact = frozenset(id(o) for o in g.optimizers if tuple(map(id, _opt_params(o))) == ids)
        g = g._replace(members=frozenset(ids), exact=exact, ids=ids)
        ref = weakref.ref(opt, lambda _, key=id(opt), groups=self._groups: groups.pop(key, None))
        self._groups[id(opt)] = (self.version, ref, g._replace(optimizers=(), key=None),
                                 tuple(map(weakref.ref, g.optimizers)))
        return g

    def _decide(self, opt) -> Group:
        if id(opt) in self.explicit:
            params = tuple(p for p in (r() for r in self.explicit[id(opt)][1]) if p is not None)
            return Group(params, (opt,), opt, True)
        known = [o for o in (r() for r in self.optimizers) if o is not None]
        opts, units = [opt], []
        unit_ids = [u.ids() for u in self.units]
        changed = True
        while changed:
            changed = False
            held = {id(p) for o in opts for p in _opt_params(o)}
            for u, ids in zip(self.units, unit_ids):
                if u not in units and held & ids:
                    units.append(u)
                    changed = True
            covered = set().union(*(unit_ids[self.units.index(u)] for u in units)) if units else set()
            for o in known:
                if o not in opts and id(o) not in self.explicit and covered & {id(p) for p in _opt_params(o)}:
                    opts.append(o)
                    changed = True
        order = {id(o): k for k, o in enumerate(known)}
        opts.sort(key=lambda o: order.get(id(o), len(known)))
        params, seen = [], set()
        # an optimizer's parameter frozen now may be unfrozen later without a recompile: a step
        # takes those with a .grad, as eager's clip_grad_norm_
        for p in itertools.chain(*(u.params() for u in units), *(_opt_params(o) for o in opts)):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if len(units) > 1 or (units and not seen <= {id(p) for m in units[0].live_modules() for p in m.parameters()}):
            _in_model_order(params)
        return Group(tuple(params), tuple(opts), opts[0], False, tuple(units))

    def describe(self, units: Iterable[Unit] | None = None) -> str:
        names = sorted({u.describe() for u in (self.units if units is None else units)})
        return ", ".join(names) if names else "nothing yet"

    def live(self) -> bool:
        return any(u.live_modules() or any(r() is not None for r in u.leaves.values()) for u in self.units)
