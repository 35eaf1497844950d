"""Clipping fused into a compiled optimizer step: ``torch.compile(opt.step, backend=clip)``.

Dynamo compiles an optimizer step into graphs whose gradients are placeholders lifted from
``param.grad`` (a ``GradSource``). ``ClipBackend`` hands such a graph to ``compile_step``,
which inserts the clip at the torch level (``compileclip.passes.insert_step_clip``) before
Inductor sees it, so that ``grad * coef`` is computed inside the optimizer's update loop.

The step sees the final ``.grad`` of every parameter the optimizer updates, so this path is
exact with gradient accumulation, graph breaks in the model, or an eager model. It clips the
parameters of the optimizer (eager: ``clip_grad_norm_(all params of the optimizer)``).

One object for model and step: once this backend has compiled a step, backwards leave the
gradients alone and the step clips the final ``.grad`` (so accumulation needs no context
manager). A backward that clipped before the step was compiled (the first one) makes the next
step run with ``enabled=False``, so the gradients are clipped exactly once per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .passes import grad_placeholders, insert_step_clip

if TYPE_CHECKING:
    from .backend import ClipBackend


def is_step_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is a Dynamo graph that takes gradients (``param.grad``) as inputs: the
    body of a compiled optimizer step."""
    return bool(grad_placeholders(gm))


def _frame_optimizers() -> list[torch.optim.Optimizer]:
    """The optimizers in the locals of the frame Dynamo is compiling (``self`` of ``step``)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = InstructionTranslator.current_tx().f_locals
    except Exception:  # not under Dynamo (a direct call of the backend) or API moved
        return []
    return [v for v in f_locals.values() if isinstance(v, torch.optim.Optimizer)]


def _check_coverage(grad_inputs: list[torch.Tensor]) -> None:
    """The norm must cover every gradient the optimizer updates with, as eager
    ``clip_grad_norm_`` over the optimizer's parameters does. A step split into several graphs
    would give each a partial norm: refuse that instead of clipping wrongly. Dynamo guards on
    which ``.grad`` are None, so a check at compile time holds for every run of the graph."""
    seen = {id(g) for g in grad_inputs}
    for opt in _frame_optimizers():
        missing = [
            p for group in opt.param_groups for p in group["params"]
            if p.grad is not None and id(p.grad) not in seen
        ]
        if missing:
            raise RuntimeError(
                f"compileclip: the compiled step graph of {type(opt).__name__} takes "
                f"{len(grad_inputs)} gradients, but {len(missing)} more parameters of the "
                "optimizer have a .grad (the step was split into several graphs?). A norm "
                "over part of the gradients would clip wrongly. Clip before the step instead "
                "(torch.nn.utils.clip_grad_norm_), or compile the model with the clip backend."
            )


def _copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` to rewrite: Dynamo keeps using the graph it passed to the backend
    (it reads its placeholders' ``grapharg`` after the backend returns), so the rewrite must
    not add placeholders to it. Keeps what AOTAutograd reads from a Dynamo graph module."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    rv = graph.graph_copy(gm.graph, val_map)
    old_out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    graph.output(rv).meta.update(old_out.meta)
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    out = fx.GraphModule(gm, graph, gm.__class__.__name__)
    out.meta.update(gm.meta)
    for attr in ("_param_name_to_source", "_source_to_user_stacks", "compile_subgraph_reason"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out


class _ClippedStep:
    """Calls the compiled step graph with ``max_norm`` as its last input and strips the total
    norm it returns into the runtime (no host sync)."""

    def __init__(self, compiled, backend: ClipBackend, device: torch.device) -> None:
        self.compiled = compiled
        self.runtime = backend._runtime
        self.device = device

    def __call__(self, *args: Any) -> Any:
        rt = self.runtime
        clip = rt.begin_step()
        full = [*args, rt.max_norm_on(self.device), rt.enabled_on(self.device, clip)]
        # Dynamo calls what a backend returns with *args, whatever ``_boxed_call`` says
        # (aot_module_simplified's unboxed forward copies that attribute from its callee)
        outs = self.compiled(*full)
        outs = list(outs)
        total = outs.pop()
        if clip:
            rt.total_norm = total
        return outs


class _EagerClippedStep:
    """``fuse=False``: eager ``clip_grad_norm_`` over the gradient inputs, then the compiled
    step without a clip (for comparison and debugging)."""

    def __init__(self, compiled, backend: ClipBackend, grad_positions: list[int]) -> None:
        self.compiled = compiled
        self.runtime = backend._runtime
        self.grad_positions = grad_positions

    def __call__(self, *args: Any) -> Any:
        if self.runtime.begin_step():
            self.runtime.clip_(args[i] for i in self.grad_positions)
        return self.compiled(*args)


def _compile(config, gm: fx.GraphModule, inputs: list[Any]):
    from .backend import _no_autograd_cache

    with _no_autograd_cache():
        if config.inner == "aot_eager":
            return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs)


def compile_step(backend: ClipBackend, gm: fx.GraphModule, example_inputs: list[Any]):
    """Compile a Dynamo step graph with the clip inserted (see the module docstring)."""
    config = backend.config
    if config.error_if_nonfinite:
        # eager raises before the update; inside one step graph that needs a host sync
        # between the norm and the update, which would split the fused step
        raise NotImplementedError(
            "compileclip: error_if_nonfinite=True is not supported for a compiled optimizer "
            "step (it would raise after the parameters were updated). Use "
            "error_if_nonfinite=False, or clip_grad_norm_(..., error_if_nonfinite=True) "
            "before an uncompiled-clip step."
        )
    backend._runtime.step_compiled = True
    grads = grad_placeholders(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    grad_positions = [placeholders.index(g) for g in grads]
    grad_inputs = [example_inputs[i] for i in grad_positions]
    _check_coverage(grad_inputs)
    if not config.fuse:
        return _EagerClippedStep(_compile(config, gm, example_inputs), backend, grad_positions)
    gm = _copy_dynamo_graph(gm)
    grads = grad_placeholders(gm)
    device = grad_inputs[0].device
    # TODO(issue 3): when this backend also compiled the model, the backward could compute
    # the norm where the gradients are produced and the step only fold the coefficient in.
    insert_step_clip(gm, grads, config.norm_type, write_grad=config.step_writes_grad)
    rt = backend._runtime
    inputs = [*example_inputs, rt.max_norm_on(device), rt.enabled_on(device, True)]
    return _ClippedStep(_compile(config, gm, inputs), backend, device)
