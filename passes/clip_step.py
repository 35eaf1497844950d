"""Insert the clip into a Dynamo graph of an optimizer step.

``torch.compile(opt.step)`` gives Dynamo graphs whose gradients are placeholders lifted from
``param.grad`` (a ``GradSource``, or an ``AttrSource`` for a user's Optimizer subclass); the
parameters and the optimizer state are attributes of the graph module. ``insert_step_clip``
works on that torch-level graph, before AOTAutograd and Inductor: it traces
``clip(grads, inputs, params) -> (clipped grads, outputs)`` right after the placeholders (with
the runtime inputs as new placeholders), replaces every other use of a gradient by its clipped
value, copies the clipped values back into the gradients last (eager leaves ``.grad``
clipped), and appends the outputs. As the optimizer's update is the only reader of a clipped
gradient, Inductor computes ``g * coef`` inside the update's loop: the scale and the write-back
cost no pass of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.fx as fx

from .signature import GraphSignature
from .tracing import output_node, trace_into


def _source(n: fx.Node):
    src = getattr(n, "_dynamo_source", None)
    if src is None and "grapharg" in n.meta:
        src = getattr(n.meta["grapharg"], "source", None)
    return src


def grad_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    """The placeholders of ``gm`` that Dynamo lifted from a ``param.grad``: a ``GradSource``,
    or the ``AttrSource(param, 'grad')`` Dynamo gives a user's Optimizer subclass."""
    from torch._dynamo.source import AttrSource, GradSource

    out = []
    for n in gm.graph.find_nodes(op="placeholder"):
        src = _source(n)
        if isinstance(src, (GradSource, AttrSource)) and getattr(src, "member", None) == "grad":
            out.append(n)
    return out


def param_nodes(gm: fx.GraphModule, grads: list[fx.Node], first: fx.Node) -> list[fx.Node]:
    """The parameter of each gradient placeholder: the placeholder or attribute whose source is
    the gradient's source's base. New ``get_attr`` nodes go before ``first`` (before any update),
    so that they read the parameter as the step found it."""
    by_source = {src: n for n in gm.graph.find_nodes(op="placeholder") if (src := _source(n)) is not None}
    attrs = {src: name for name, src in getattr(gm, "_param_name_to_source", {}).items()}
    out = []
    for g in grads:
        base = getattr(_source(g), "base", None)
        if base in by_source:
            out.append(by_source[base])
        elif base in attrs:
            with gm.graph.inserting_before(first):
                node = gm.graph.get_attr(attrs[base])
            fake_mode = getattr(g.meta.get("example_value"), "fake_mode", None)
            if fake_mode is not None:
                node.meta["example_value"] = fake_mode.from_tensor(getattr(gm, attrs[base]), static_shapes=True)
            out.append(node)
        else:
            raise NotImplementedError(
                f"compileclip: could not find the parameter of gradient {g.name} in the step graph; "
                "clip unit-wise (AGC) eagerly instead (compile the model only)")
    return out


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo graph module to rewrite: Dynamo keeps using the graph it passed to the
    backend (it reads its placeholders' ``grapharg`` after the backend returns), so a rewrite
    must not add placeholders to it. Keeps what AOTAutograd reads from a Dynamo graph module."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    rv = graph.graph_copy(gm.graph, val_map)
    graph.output(rv).meta.update(output_node(gm.graph).meta)
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    out = fx.GraphModule(gm, graph, gm.__class__.__name__)
    out.meta.update(gm.meta)
    for attr in ("_param_name_to_source", "_source_to_user_stacks", "compile_subgraph_reason"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out


def _add_placeholders(gm: fx.GraphModule, inputs: Mapping, fake_mode) -> dict:
    """A placeholder per input after the last one (a list of examples: one per element)."""
    graph = gm.graph
    anchor = list(graph.find_nodes(op="placeholder"))[-1]
    added: dict = {}
    for name, example in inputs.items():
        nodes = []
        for k, ex in enumerate(example if isinstance(example, (list, tuple)) else [example]):
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"clip_{name}" if not isinstance(example, (list, tuple)) else f"clip_{name}_{k}")
            # AOTAutograd maps Dynamo placeholders to their sources; ours have none (like the
            # placeholders DDPOptimizer's split adds)
            anchor._dynamo_source = None
            if fake_mode is not None:
                anchor.meta["example_value"] = fake_mode.from_tensor(ex, static_shapes=True)
            nodes.append(anchor)
        added[name] = nodes if isinstance(example, (list, tuple)) else nodes[0]
    return added


def insert_step_clip(gm: fx.GraphModule, grads: list[fx.Node], clip: Callable, *, inputs: Mapping,
                     write_grad: bool = True, with_params: bool = False) -> GraphSignature:
    """Clip the gradient placeholders ``grads`` of the Dynamo step graph ``gm`` with ``clip``
    (see the module docstring). ``inputs``: name -> example value (or list of them) of each
    runtime input. ``with_params``: ``clip`` also gets the parameter of each gradient (read
    before the update). Returns the added inputs and outputs, by name."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if not grads or any(g not in placeholders for g in grads):
        raise ValueError("insert_step_clip needs gradient placeholders of gm")
    vals = [g.meta.get("example_value") for g in grads]
    # the mode the example values were made in (the tracing context may hold another)
    fake_mode = getattr(vals[0], "fake_mode", None) if all(v is not None for v in vals) else None
    added = _add_placeholders(gm, inputs, fake_mode)
    body = list(graph.find_nodes(op="placeholder"))[-1].next  # the first node of the step itself
    params = param_nodes(gm, grads, body) if with_params else None
    step_nodes = _from(body)
    clipped, outputs = trace_into(gm, body, clip, (grads, added, params), meta_key="example_value",
                                  fake_mode=fake_mode)
    for g, c in zip(grads, clipped):
        if c is not g:  # the clip's own nodes keep reading the gradient itself
            g.replace_all_uses_with(c, delete_user_cb=lambda user: user in step_nodes)
    out = output_node(graph)
    if write_grad:
        for g, c in zip(grads, clipped):
            if c is not g:
                trace_into(gm, out, lambda a, b: a.copy_(b), (g, c), meta_key="example_value", fake_mode=fake_mode)
    outs = out.args[0]
    if not isinstance(outs, (list, tuple)):
        raise ValueError(f"unexpected output structure of the step graph: {outs!r}")
    extra = list(outputs.values())
    out.args = (type(outs)([*outs, *extra]) if isinstance(outs, list) else (*outs, *extra),)
    graph.lint()
    gm.recompile()
    return GraphSignature(tuple(added), tuple(outputs))


def _from(node: fx.Node) -> set:
    """``node`` and every node after it."""
    out = set()
    while node.op != "root":
        out.add(node)
        node = node.next
    return out
