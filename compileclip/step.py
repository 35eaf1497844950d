"""Clipping fused into a compiled optimizer step: ``torch.compile(opt.step, backend=clip)``.

Dynamo compiles an optimizer step into graphs whose gradients are placeholders lifted from
``param.grad``. ``ClipBackend`` hands such a graph to ``compile_step_graph``, which traces the
clip (``clipmath.step_clip``) into it before Inductor sees it (``passes.insert_step_clip``), so
that ``grad * coef`` is computed inside the optimizer's update loop. The runtime inputs and the
outputs the pass adds are named by its ``GraphSignature``.

Two variants of a graph: one computes the norm of its gradients, the other takes it as an input
(the norms of the backward graphs, or a group's norm taken at the pre-hook: ``plan.py``). Each
is compiled when a step first needs it. Whether the graph clips at all, and which norm it gets,
is the step plan's (``ClipRuntime.graph_call``): a step whose gradients the pre-hook already
clipped runs the graph with ``enabled=False``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from . import clipmath, ops
from .compiling import compile_graph
from .eager import is_dtensor
from .passes import GraphSignature, copy_graph, grad_placeholders, guard_input_mutations, insert_step_clip
from .step_call import ClippedStep, EagerClipThenStep

if TYPE_CHECKING:
    from .backend import ClipBackend


def is_step_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is a Dynamo graph that takes gradients (``param.grad``) as inputs: the
    body of a compiled optimizer step."""
    return bool(grad_placeholders(gm))


def is_fused(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` runs a fused kernel, which Dynamo does not trace (``fused=True``)."""
    return any(group.get("fused") for group in opt.param_groups) or bool(opt.defaults.get("fused"))


def _frame_optimizers() -> list[torch.optim.Optimizer]:
    """The optimizers in the locals of the frame Dynamo is compiling: ``self`` of ``step``, in
    the ``args`` of a decorator's wrapper (``@torch.no_grad()`` on a user's ``step``), or the
    object of the bound method that ``torch.compile`` wraps (``fn`` of Dynamo's ``inner``)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = InstructionTranslator.current_tx().f_locals
    except (ImportError, AttributeError, RuntimeError, AssertionError):  # not under Dynamo
        return []
    found = []
    for v in f_locals.values():
        for x in (v if isinstance(v, tuple) else (v, getattr(v, "__self__", None))):
            if isinstance(x, torch.optim.Optimizer) and not any(x is o for o in found):
                found.append(x)
    return found


def _check(config, rt, grad_inputs: list[torch.Tensor], optimizers: list) -> None:
    """Refuse what a compiled step cannot clip as eager does, before compiling it."""
    if config.error_if_nonfinite:
        raise NotImplementedError(
            "compileclip: error_if_nonfinite=True is not supported for a compiled optimizer step "
            "(it would raise after the parameters were updated). Use skip_nonfinite=True (skip the "
            "update on the device), or clip_grad_norm_(..., error_if_nonfinite=True) before an "
            "uncompiled-clip step.")
    seen = {id(g) for g in grad_inputs}
    for opt in optimizers:
        # a step split into several graphs would give each a partial norm (Dynamo guards on
        # which .grad are None, so a check at compile time holds for every run of the graph)
        missing = [p for group in opt.param_groups for p in group["params"] if p.grad is not None and id(p.grad) not in seen]
        if missing:
            raise RuntimeError(
                f"compileclip: the compiled step graph of {type(opt).__name__} takes {len(grad_inputs)} "
                f"gradients, but {len(missing)} more parameters of the optimizer have a .grad (the step "
                "was split into several graphs?). A norm over part of the gradients would clip "
                "wrongly. Clip before the step instead (torch.nn.utils.clip_grad_norm_), or compile "
                "the model with the clip backend.")
    if rt.scaler is not None and any(g.dtype == torch.float16 for g in grad_inputs):
        # GradScaler.unscale_ refuses these too (allow_fp16=False)
        raise ValueError(
            "compileclip: a GradScaler is attached but the step's gradients include float16 ones; "
            "GradScaler.unscale_ refuses to unscale FP16 gradients. Keep the parameters in float32 "
            "and run the forward under torch.autocast")
    if (config.skip_nonfinite or rt.scaler is not None) and len(optimizers) != 1:
        raise NotImplementedError(
            "compileclip: skip_nonfinite=True or a GradScaler needs the compiled step to belong to "
            f"one optimizer; this step graph sees {len(optimizers)}. Compile each optimizer's step "
            "separately")


# Every kernel of a clipped step reads the one clip coefficient. Inductor looks for fusions
# among the nodes that read a common buffer, pairwise within a window of this many, so the
# coefficient's group of n nodes costs n * window fusion checks per round (measured: SGD over
# 1024 tensors compiled in 189 s with the default 64, against 66 s without the clip). The
# nodes of one parameter share their own buffers in groups of a few nodes, which a window of 4
# still covers whole. Not ``emulate_precision_casts``: Inductor keeps ``g * coef`` of a bf16
# gradient in float32 inside the update's loop, where eager rounds it first; emulating the
# casts rounded inside ``add_(alpha=)`` too and made it worse (230 against 186 of 4096 bf16
# elements off one ulp, measured).
STEP_PATCHES = {"max_fusion_buffer_group_pairwise_attempts": 4}


def compile_step_graph(backend: ClipBackend, gm: fx.GraphModule, example_inputs: list[Any], patches: dict):
    """Compile a Dynamo step graph with the clip traced in (see the module docstring)."""
    config, rt = backend.config, backend._runtime
    grads = grad_placeholders(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    grad_positions = [placeholders.index(g) for g in grads]
    grad_inputs = [example_inputs[i] for i in grad_positions]
    optimizers = _frame_optimizers()
    _check(config, rt, grad_inputs, optimizers)
    optimizer = optimizers[0] if len(optimizers) == 1 else None
    if optimizer is not None and is_fused(optimizer):  # Dynamo runs the fused kernel eagerly
        return compile_graph(config.inner, gm, example_inputs, config_patches=patches)
    rt.graph_compiled()
    for opt in optimizers:
        rt.scope.know(opt)
    if not config.fuse:  # the plan clips at the pre-hook (or here, for an unplanned step)
        return EagerClipThenStep(compile_graph(config.inner, gm, example_inputs, config_patches=patches), rt, optimizer)
    _warn_low_precision(rt, config, grad_inputs)
    builder = _Variants(backend, gm, example_inputs, grad_positions, grad_inputs, optimizer, optimizers,
                        {**STEP_PATCHES, **patches})
    step = rt.open
    handed = step is not None and step.handed is not None and step.optimizer() is optimizer
    builder.get(handed or _norm_will_be_handed(rt, optimizer, builder))
    return ClippedStep(builder, rt, optimizer, _initializing(optimizer) and builder.guarded)


def _norm_will_be_handed(rt, optimizer, builder) -> bool:
    """At a step the pre-hook clips eagerly (the graph's first run, which does not clip): whether
    later steps will hand the graph the backward's norms (the model is compiled with this clip,
    and its records cover the step's gradients). Then that variant is the one compiled first,
    and this step runs it disabled: one Inductor compile of the step instead of two."""
    step = rt.open
    return (step is not None and optimizer is not None and step.optimizer() is optimizer and step.backward_norms
            and not builder.guarded)


def _warn_low_precision(rt, config, grad_inputs) -> None:
    if config.max_norm is not None and any(g.dtype in (torch.bfloat16, torch.float16) for g in grad_inputs):
        rt.warn_once(
            "low_precision_step",
            "the compiled step clips bfloat16/float16 gradients inside the optimizer's update, "
            "where Inductor keeps the clipped gradient in float32; eager rounds it to the "
            "gradient's dtype first. The parameters can differ from eager by about one ulp of "
            "that dtype per clipped step (measured: 2 of 32 bf16 weights at the first step), on "
            "top of Inductor's own rounding of the update. For eager's exact numbers keep float32 "
            "parameters (torch.autocast for the forward), or clip in the model only (no compile_step)")


def _shard_spec(grad_inputs) -> dict:
    """For DTensor gradients whose total norm the local shards give (``shards.reduce_dims``):
    the process group names of the reduced mesh dimensions and the replicating function."""
    if not any(is_dtensor(g) for g in grad_inputs):
        return {}
    from . import shards

    local = shards.placements_of(grad_inputs)
    dims = shards.reduce_dims(local[1]) if local is not None else None
    if dims is None:
        return {}
    mesh = local[0]
    return {"shard_groups": tuple(mesh.get_group(d).group_name for d in dims),
            "replicate": clipmath._replicated(mesh)}


def _groups(grad_inputs) -> list[list[int]]:
    """The gradients' positions per (device, dtype) (``clipmath.step_groups``)."""
    return clipmath.step_groups([g.to_local() if is_dtensor(g) else g for g in grad_inputs])


def _norm_dtype(grad_inputs) -> torch.dtype:
    """The total norm's dtype: float64 where a gradient is float64 (eager stacks the norms,
    which promotes), else float32."""
    dtypes = {ops.norm_dtype((g.to_local() if is_dtensor(g) else g).dtype) for g in grad_inputs}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _initializing(optimizer) -> bool:
    """The graph was traced while some parameter had no optimizer state: it creates it (SGD's
    momentum buffer; Dynamo initializes Adam's moments before tracing)."""
    return optimizer is not None and any(
        not optimizer.state.get(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None)


class _Variants:
    """The two variants of one step graph, each compiled when first needed."""

    def __init__(self, backend, gm, example_inputs, grad_positions, grad_inputs, optimizer, optimizers, patches):
        rt, config = backend._runtime, backend.config
        self.rt, self.config, self.gm, self.example_inputs = rt, config, gm, example_inputs
        self.grad_positions, self.patches = grad_positions, patches
        self.guarded = config.skip_nonfinite or rt.scaler is not None
        self.device = grad_inputs[0].device
        self.optimizer = optimizer
        mon = rt.monitors.for_optimizer(rt.scope.group(optimizer).key if optimizer is not None else None)
        self.policy = mon.policy
        self.state = mon.policy_state(self.device) if mon.policy is not None else []
        self.spec = clipmath.StepClipSpec(
            norm_type=config.norm_type, groups=tuple(map(tuple, _groups(grad_inputs))),
            device=self.device, devices=tuple(g.device for g in grad_inputs), ndims=tuple(g.ndim for g in grad_inputs),
            clip_norm=config.max_norm is not None, compute_norm=self.guarded or config.computes_norm,
            clip_value=config.clip_value is not None, unscale=rt.scaler is not None,
            dtensor=any(is_dtensor(g) for g in grad_inputs),
            policy=None if mon.policy is None else (mon.policy.kind, tuple(mon.policy.params)),
            agc=None if mon.agc is None else (mon.agc.clipping, mon.agc.eps), parts=mon.per_param,
            norm_dtype=_norm_dtype(grad_inputs), **_shard_spec(grad_inputs))
        if self.spec.dtensor and mon.per_param:
            raise NotImplementedError(
                "compileclip: per_param_norms=True is not supported in a compiled step over DTensor "
                "gradients (FSDP2): compile the model with the clip and step eagerly")
        by_grad = {id(p.grad): p for o in optimizers for g in o.param_groups for p in g["params"] if p.grad is not None}
        self.grad_params = tuple(weakref.ref(by_grad[id(t)]) for t in grad_inputs) if mon.per_param else ()
        self.compiled: dict[bool, tuple] = {}
        self._signatures: dict[bool, GraphSignature] = {}

    def inputs(self, given: bool) -> dict:
        """The runtime inputs' example values, in the graph's order (their names are the
        ``clipmath.step_clip`` keys)."""
        f32 = torch.zeros((), dtype=torch.float32, device=self.device)
        norm = torch.zeros((), dtype=self.spec.norm_dtype, device=self.device)  # max_norm and the norm
        ex = {"max_norm": norm, "enabled": torch.ones((), dtype=torch.bool, device=self.device)}
        if self.spec.clip_value:
            ex["clip_value"] = f32
        if self.spec.unscale:
            ex["scale"] = f32
        if given:
            ex["total_norm"] = norm
        if self.policy is not None:
            ex["state"] = list(self.state)
        return ex

    def signature(self, given: bool) -> GraphSignature:
        """The runtime inputs by name, in the graph's order (made once: ``inputs`` makes tensors)."""
        sig = self._signatures.get(given)
        if sig is None:
            sig = self._signatures[given] = GraphSignature(tuple(self.inputs(given)))
        return sig

    def get(self, given: bool, call_inputs: list | None = None):
        if given not in self.compiled:
            self.compiled[given] = self._build(given, call_inputs)
        return self.compiled[given]

    def _build(self, given: bool, call_inputs: list | None):
        g = copy_graph(self.gm)
        spec = clipmath.StepClipSpec(**{**vars(self.spec), "given_norm": given,
                                        "parts": self.spec.parts and not given})
        ex = self.inputs(given)
        sig = insert_step_clip(g, grad_placeholders(g), lambda gr, inp, ps: clipmath.step_clip(gr, inp, spec, ps),
                               inputs=ex, write_grad=self.config.step_writes_grad, with_params=spec.agc is not None)
        inputs = list(call_inputs) if call_inputs is not None else sig.bind(self.example_inputs, ex)
        n_dynamo = len(inputs)
        flag = sig.outputs.index("nonfinite") - len(sig.outputs) if "nonfinite" in sig.outputs else None

        def guard(inner: fx.GraphModule, inner_inputs: list[Any]) -> None:
            # AOTAutograd puts the graph module's own parameters and buffers (the optimizer
            # state Dynamo installed as attributes) before the Dynamo placeholders
            offset = len(inner_inputs) - n_dynamo
            if offset < 0:
                raise RuntimeError("compileclip: unexpected inputs of the compiled step graph")
            guard_input_mutations(inner, flag, exclude=[offset + i for i in self.grad_positions])

        compiled = compile_graph(self.config.inner, g, inputs, forward_rewrite=guard if self.guarded else None,
                                 config_patches=self.patches)
        inner = getattr(compiled, "_torchdynamo_orig_callable", None)
        if getattr(compiled, "_torchdynamo_disable", False) and inner is not None:
            # ``ClippedStep`` runs only inside the ``torch._dynamo.disable`` wrapper Dynamo puts
            # around a backend's callable (no frame evaluation): the one around Inductor's own
            # is a second (a few us a step)
            compiled = inner
        return compiled, sig
