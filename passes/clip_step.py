"""Insert gradient-norm clipping into a Dynamo graph of an optimizer step.

``torch.compile(opt.step)`` gives Dynamo graphs whose gradients are placeholders with a
``GradSource`` (``param.grad``); the parameters and the optimizer state are attributes of the
graph module. This rewrite works on that torch-level graph, before AOTAutograd and Inductor:

    total = ||(||g_1||_p, ..., ||g_n||_p)||_p          # one compileclip::total_norm call
    coef  = clamp(max_norm / (total + 1e-6), max=1)
    every use of g_i  ->  g_i * coef
    g_i.copy_(g_i * coef)                              # optional, last: eager leaves .grad clipped

``max_norm`` (a 0-d float32 tensor) and ``enabled`` (0-d bool; false makes the coefficient
exactly 1) become the last two placeholders so that changing them does not recompile, and the
total norm becomes one more output (the last one). Because the
optimizer update is the only reader of the scaled gradient, Inductor computes ``g * coef``
inside the update's loop: the clip costs one read of the gradients (the norm) and no pass of
its own. The write-back, if kept, is stored by that same loop.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx

from . import norm_op
from .agc import agc_factor, param_nodes
from .thresholds import THRESHOLD

# eager clip_grad_norm_ adds this to the norm before dividing
EPS = 1e-6


def runtime_input_names(*, clip_value: bool, unscale: bool, given_norm: bool = False) -> list[str]:
    """The placeholders a pass adds for the clip's runtime inputs, in the order the caller
    passes them: max norm, enabled flag, then value bound, GradScaler scale, total norm."""
    names = ["clip_max_norm", "clip_enabled"]
    if clip_value:
        names.append("clip_value")
    if unscale:
        names.append("clip_scale")
    if given_norm:
        names.append("clip_total_norm")
    return names


def add_scalar_placeholders(
    graph: fx.Graph, after: fx.Node, names: Sequence[str], fake_mode, device, meta_key: str
) -> dict[str, fx.Node]:
    """0-d placeholders ``names`` after ``after`` (``clip_enabled`` bool, the others float32),
    with a fake value under ``meta[meta_key]`` ("val" for aten graphs, "example_value" for
    Dynamo graphs) when ``fake_mode`` is given."""
    added = {}
    anchor = after
    for name in names:
        with graph.inserting_after(anchor):
            anchor = added[name] = graph.placeholder(name)
        if fake_mode is not None:
            dtype = torch.bool if name == "clip_enabled" else torch.float32
            with fake_mode:
                anchor.meta[meta_key] = torch.empty((), dtype=dtype, device=device)
    return added


def grad_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    """The placeholders of ``gm`` that Dynamo lifted from a ``param.grad`` (GradSource)."""
    from torch._dynamo.source import GradSource

    out = []
    for n in gm.graph.find_nodes(op="placeholder"):
        src = getattr(n, "_dynamo_source", None)
        if src is None and "grapharg" in n.meta:
            src = getattr(n.meta["grapharg"], "source", None)
        if isinstance(src, GradSource) and getattr(src, "member", "grad") == "grad":
            out.append(n)
    return out


@dataclasses.dataclass(frozen=True)
class StepClipInsertion:
    """What ``insert_step_clip`` changed: the gradient placeholders it clips (their positions
    among the placeholders), the added placeholders' names in the order the caller passes
    them, and whether the clipped gradients are copied back into the gradient inputs."""

    grad_positions: tuple[int, ...]
    placeholders: tuple[str, ...]
    writes_grad: bool
    outputs: tuple[str, ...]  # what was appended to the outputs: "total_norm", "nonfinite"


class _Builder:
    """Inserts torch-level nodes before ``anchor``, each with ``meta["example_value"]`` (what
    Dynamo's own nodes carry) computed under the graph's fake mode when there is one."""

    def __init__(self, gm: fx.GraphModule, fake_mode, anchor: fx.Node) -> None:
        self.graph = gm.graph
        self.fake_mode = fake_mode
        self.anchor = anchor
        self.new: set[fx.Node] = set()

    _MISSING = object()

    def _val(self, a):
        if isinstance(a, (list, tuple)):
            return type(a)(self._val(x) for x in a)
        return a.meta.get("example_value", self._MISSING) if isinstance(a, fx.Node) else a

    def _has_vals(self, vals) -> bool:
        return all(self._has_vals(v) if isinstance(v, (list, tuple)) else v is not self._MISSING for v in vals)

    def __call__(self, op: str, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, tuple(args), kwargs)
        self.new.add(node)
        if self.fake_mode is not None:
            vals = [self._val(a) for a in args]
            kw = {k: self._val(v) for k, v in kwargs.items()}
            if self._has_vals(vals) and self._has_vals(kw.values()):
                with self.fake_mode:
                    fn = getattr(vals[0], target) if op == "call_method" else target
                    v = fn(*vals[1:], **kw) if op == "call_method" else fn(*vals, **kw)
                node.meta["example_value"] = v
        return node

    def fn(self, target, *args, **kwargs) -> fx.Node:
        return self("call_function", target, *args, **kwargs)

    def method(self, name, *args, **kwargs) -> fx.Node:
        return self("call_method", name, *args, **kwargs)


def _is_dtensor(v) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed
        return False
    return isinstance(v, DTensor)


def _norm_per_gradient(b: _Builder, grads: list[fx.Node], unscaled: list[fx.Node], p: float, device) -> fx.Node:
    """The total norm as one reduction per gradient, combined: for DTensor gradients (FSDP2),
    whose sharding DTensor propagates through these ops (it has no strategy for the norm
    operator). Costs a reduction per gradient, where the operator costs one call."""
    partials = []
    for g, u in zip(grads, unscaled):
        val = u.meta.get("example_value")
        if val is None or val.dtype != torch.float32:
            u = b.method("to", u, torch.float32)
        if math.isinf(p):
            part = b.fn(torch.amax, b.fn(torch.abs, u))
        elif p == 2.0:
            part = b.fn(torch.sum, b.fn(torch.mul, u, u))
        else:
            a = b.fn(torch.abs, u)
            part = b.fn(torch.sum, a if p == 1.0 else b.fn(torch.pow, a, p))
        gval = g.meta.get("example_value")
        if gval is not None and gval.device != device:  # gradients on several devices
            part = b.method("to", part, device)
        partials.append(part)
    combine = torch.maximum if math.isinf(p) else torch.add
    total = partials[0]
    for part in partials[1:]:
        total = b.fn(combine, total, part)
    if not math.isinf(p):
        total = b.fn(torch.sqrt, total) if p == 2.0 else b.fn(torch.pow, total, 1.0 / p) if p != 1.0 else total
    return total


def _on(b: _Builder, x: fx.Node, g: fx.Node, device) -> fx.Node:
    """``x`` (a 0-d tensor on ``device``) moved to ``g``'s device where that differs."""
    gval = g.meta.get("example_value")
    if gval is not None and gval.device != device:
        return b.method("to", x, gval.device)
    return x


def insert_step_clip(
    gm: fx.GraphModule,
    grads: list[fx.Node],
    norm_type: float,
    *,
    clip_norm: bool = True,
    compute_norm: bool = False,
    clip_value: bool = False,
    unscale: bool = False,
    given_norm: bool = False,
    write_grad: bool = True,
    policy: tuple[str, Sequence[float], Sequence[torch.Tensor]] | None = None,
    agc: tuple[float, float] | None = None,
    parts: bool = False,
) -> StepClipInsertion:
    """Clip the gradient placeholders ``grads`` of the Dynamo step graph ``gm`` (see the
    module docstring).

    Placeholders added last, in this order: ``clip_max_norm`` (0-d float32) and
    ``clip_enabled`` (0-d bool; false: no clipping, the gradients were clipped by a backward),
    then ``clip_value`` (0-d float32) if ``clip_value``, then ``clip_scale`` (0-d float32, a
    GradScaler's scale) if ``unscale``: every gradient is first divided by it, as
    ``GradScaler.unscale_`` does. The norm is computed for ``clip_norm`` (scale by
    ``clamp(max_norm / (norm + 1e-6), max=1)``) or ``compute_norm``; then two outputs are
    appended: the total norm of the (unscaled) gradients (0-d float32) and ``nonfinite``
    (0-d float32, 1.0 where that norm is nan/inf: GradScaler's ``found_inf``).
    ``clip_value`` clamps every element to ``[-clip_value, clip_value]`` after the norm clip
    (whatever ``enabled`` says: clamping is idempotent).
    ``given_norm`` takes the total norm as one more placeholder, ``clip_total_norm`` (0-d
    float32, computed where the gradients were produced, by a backward graph), instead of
    computing it: the step then reads each gradient once, in the update; only the
    ``nonfinite`` flag is appended to the outputs.
    ``write_grad`` copies the clipped gradient back into each gradient input after the
    update, so that ``.grad`` ends as eager clipping leaves it (after any in-place change
    the optimizer itself makes to the gradient).
    ``policy`` (kind, params, example state tensors): the threshold is the operator
    ``compileclip::threshold`` of the total norm and of the policy's state, which comes in as
    one placeholder per state tensor (``clip_state_<i>``, after all the others, read only);
    the threshold is appended to the outputs (``"threshold"``) for the runtime to record and
    to update the state with. ``agc`` (clipping, eps): unit-wise clipping of every gradient
    against its parameter (read from the graph, before the update) instead of the norm clip;
    the total norm is still computed and returned. ``parts``: each gradient's norm too, from
    the same operator call, as an output (``"param_norms"``, 1-D, in ``grads``' order)."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if not grads:
        raise ValueError("insert_step_clip needs at least one gradient placeholder")
    if any(g not in placeholders for g in grads):
        raise ValueError("grads must be placeholders of gm")
    positions = tuple(placeholders.index(g) for g in grads)
    output = graph.output_node() if hasattr(graph, "output_node") else next(
        n for n in reversed(graph.nodes) if n.op == "output"
    )
    vals = [g.meta.get("example_value") for g in grads]
    fake_mode = None
    if all(v is not None for v in vals):
        # the mode the example values were made in (the tracing context may hold another)
        fake_mode = getattr(vals[0], "fake_mode", None)
    device = vals[0].device if vals[0] is not None else None

    names = runtime_input_names(clip_value=clip_value, unscale=unscale, given_norm=given_norm)
    added = add_scalar_placeholders(graph, placeholders[-1], names, fake_mode, device, "example_value")
    for node in added.values():
        # AOTAutograd maps Dynamo placeholders to their sources; ours have none (like the
        # placeholders DDPOptimizer's split adds)
        node._dynamo_source = None
    max_norm, enabled = added["clip_max_norm"], added["clip_enabled"]
    states = []
    if policy is not None:
        anchor = added[names[-1]]
        for i, example in enumerate(policy[2]):
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"clip_state_{i}")
            anchor._dynamo_source = None
            if fake_mode is not None:
                anchor.meta["example_value"] = fake_mode.from_tensor(example)
            states.append(anchor)
        names = [*names, *(n.name for n in states)]
        added.update({n.name: n for n in states})
    body = added[names[-1]].next  # the first node of the step itself
    params = param_nodes(gm, grads, body) if agc is not None else None

    b = _Builder(gm, fake_mode, body)
    p = float(norm_type)
    # what every use of a gradient becomes, built up step by step
    clipped = list(grads)
    inv = None
    if unscale:
        # GradScaler.unscale_: multiply by the float64 reciprocal rounded to float32, in the
        # gradient's dtype
        inv = b.method("to", b.fn(torch.reciprocal, b.method("to", added["clip_scale"], torch.float64)), torch.float32)
        clipped = [b.fn(torch.mul, g, _on(b, inv, g, device)) for g in grads]
    total = nonfinite = thr = part_norms = None
    if given_norm:
        total = added["clip_total_norm"]
    elif clip_norm or compute_norm or policy is not None or agc is not None:
        # one extern call per (device, dtype) group (norm_op): a constant number of kernels, and
        # eager's arithmetic; unscaling (``inv``) happens inside, as GradScaler.unscale_ does
        if any(_is_dtensor(v) for v in vals):
            if parts:
                raise NotImplementedError(
                    "compileclip: per_param_norms=True is not supported in a compiled step over "
                    "DTensor gradients (FSDP2): compile the model with the clip and step eagerly"
                )
            total = _norm_per_gradient(b, grads, clipped, p, device)
        else:
            totals, pieces, order = [], [], []
            for pos in norm_op.group_positions(vals):
                order.extend(pos)
                if parts:
                    both = b.fn(norm_op.TOTAL_NORM_PARTS, [grads[i] for i in pos], p, inv)
                    t = b.fn(operator.getitem, both, 0)
                    piece = b.fn(operator.getitem, both, 1)
                    pieces.append(b.method("to", piece, device) if vals[pos[0]].device != device else piece)
                else:
                    t = b.fn(norm_op.TOTAL_NORM, [grads[i] for i in pos], p, inv)
                totals.append(b.method("to", t, device) if vals[pos[0]].device != device else t)
            if parts:
                part_norms = pieces[0] if len(pieces) == 1 else b.fn(torch.cat, pieces)
                if order != sorted(order):  # back to the order of ``grads``
                    inverse = [order.index(i) for i in range(len(order))]
                    part_norms = b.fn(operator.getitem, part_norms, inverse)
            total = norm_op.combine_nodes(
                totals, p,
                power=lambda x, e: b.fn(torch.pow, x, e),
                add=lambda x, y: b.fn(torch.add, x, y),
                maximum=lambda x, y: b.fn(torch.maximum, x, y),
                root=lambda x, e: b.fn(torch.pow, x, 1.0 / e),
            )
    if total is not None:
        # 1.0 where the norm is nan or inf (|x| < inf is false for both)
        finite = b.fn(torch.lt, b.fn(torch.abs, total), math.inf)
        nonfinite = b.method("to", b.fn(torch.logical_not, finite), torch.float32)
    if policy is not None:
        # DTensor gradients (FSDP2): the total is a replicated DTensor; the policy's state is
        # plain, so the operator takes the local value (the same on every rank)
        plain_total = b.method("to_local", total) if any(_is_dtensor(v) for v in vals) else total
        thr = b.fn(THRESHOLD, plain_total, states, policy[0], [float(x) for x in policy[1]])
        max_norm = thr
    if agc is not None:
        # unit-wise, against the parameter before the update; enabled=False: factor 1
        factors = [b.fn(agc_factor, w, u, agc[0], agc[1]) for u, w in zip(clipped, params)]
        stored = b.fn(norm_op.MATERIALIZE, factors)  # see norm_op: not fused into the update
        out = []
        for i, (g, u) in enumerate(zip(grads, clipped)):
            factor = b.fn(torch.where, _on(b, enabled, g, device), b.fn(operator.getitem, stored, i), 1.0)
            out.append(b.fn(torch.mul, u, factor))
        clipped = out
    elif clip_norm:
        coef = b.fn(torch.div, max_norm, b.fn(torch.add, total, EPS))
        coef = b.fn(torch.clamp, coef, max=1.0)
        # enabled=False: coefficient exactly 1 (the gradients were already clipped by a backward)
        coef = b.fn(torch.where, enabled, coef, 1.0)
        # a 0-d float32 factor keeps the gradient's dtype, as eager's _foreach_mul_ does
        clipped = [b.fn(torch.mul, u, _on(b, coef, g, device)) for g, u in zip(grads, clipped)]
    if clip_value:
        bound = added["clip_value"]
        low = b.fn(torch.neg, bound)
        out = []
        for g, u in zip(grads, clipped):
            # also with enabled=False: a clamp applied twice is the clamp applied once, and
            # it turns the inf a backward's clamp kept (for the skip decision) into eager's
            # clipped value
            out.append(b.fn(torch.minimum, b.fn(torch.maximum, u, _on(b, low, g, device)), _on(b, bound, g, device)))
        clipped = out
    own = set(b.new)
    for g, s in zip(grads, clipped):
        if s is not g:
            g.replace_all_uses_with(s, delete_user_cb=lambda user: user not in own)

    if write_grad:
        b.anchor = output
        for g, s in zip(grads, clipped):
            if s is not g:
                b.method("copy_", g, s)

    outs = output.args[0]
    if isinstance(outs, (list, tuple)):
        appended = {}
        if total is not None:
            if not given_norm:
                appended["total_norm"] = total
            appended["nonfinite"] = nonfinite
        if thr is not None:
            appended["threshold"] = thr
        if part_norms is not None:
            appended["param_norms"] = part_norms
        extra = list(appended.values())
        output.args = (type(outs)([*outs, *extra]) if isinstance(outs, list) else (*outs, *extra),)
    else:
        raise ValueError(f"unexpected output structure of the step graph: {outs!r}")
    graph.lint()
    gm.recompile()
    return StepClipInsertion(positions, tuple(added[n].name for n in names), write_grad, tuple(appended))
