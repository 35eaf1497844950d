"""The one FX builder of the passes: trace a Python function into an existing graph.

``trace_into(gm, anchor, fn, args)`` calls ``fn`` with ``torch.fx.Proxy`` values standing for
nodes of ``gm`` (``args`` may nest nodes in lists, tuples and dicts); every torch call ``fn``
makes becomes a node inserted before ``anchor``, in order. So the clip's arithmetic is written
once, as a function on tensors, and the same function runs eagerly and inside a graph.

Each new node gets ``meta[meta_key]``, computed under ``fake_mode`` from its inputs' values:
``"example_value"`` on Dynamo graphs, ``"val"`` on the aten-level graphs AOTAutograd hands to
Inductor (whose lowering reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer


def _map(x, fn):
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map(v, fn) for v in x)
    return fn(x)


def _value(node, meta_key: str):
    return _map(node, lambda a: a.meta[meta_key] if isinstance(a, fx.Node) else a)


def trace_into(gm: fx.GraphModule, anchor: fx.Node, fn: Callable, args: tuple, *, meta_key: str,
               fake_mode=None) -> Any:
    """Insert what ``fn(*args)`` computes before ``anchor``; returns its result with the proxies
    replaced by their nodes. ``fake_mode`` None: no meta values (graphs without them)."""
    graph = gm.graph
    tracer = GraphAppendingTracer(graph)
    before = set(graph.nodes)
    with graph.inserting_before(anchor):
        result = fn(*_map(args, lambda a: fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a))
    new = [n for n in graph.nodes if n not in before]
    if fake_mode is not None:
        with fake_mode:
            for node in new:
                a, kw = _value(node.args, meta_key), _value(node.kwargs, meta_key)
                if node.op == "call_method":
                    node.meta[meta_key] = getattr(a[0], node.target)(*a[1:], **kw)
                else:
                    node.meta[meta_key] = node.target(*a, **kw)
    return _map(result, lambda r: r.node if isinstance(r, fx.Proxy) else r)


def output_node(graph: fx.Graph) -> fx.Node:
    return graph.output_node() if hasattr(graph, "output_node") else next(
        n for n in reversed(graph.nodes) if n.op == "output")
