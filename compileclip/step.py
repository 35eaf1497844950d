"""Clipping fused into a compiled optimizer step: ``torch.compile(opt.step, backend=clip)``.

Dynamo compiles an optimizer step into graphs whose gradients are placeholders lifted from
``param.grad`` (a ``GradSource``). ``ClipBackend`` hands such a graph to ``compile_step``,
which inserts the clip at the torch level (``compileclip.passes.insert_step_clip``) before
Inductor sees it, so that ``grad * coef`` is computed inside the optimizer's update loop.

The step sees the final ``.grad`` of every parameter the optimizer updates, so this path is
exact with gradient accumulation, graph breaks in the model, or an eager model. It clips the
parameters of the optimizer (eager: ``clip_grad_norm_(all params of the optimizer)``).

One object for model and step: the backward graphs compute the norm, and where their records
prove it is the norm of exactly the final ``.grad`` (``records.plan_norm``), a second variant
of the step graph takes it as an input and reads each gradient once, in the update. Each
variant is compiled when a step first needs it.

Torch's step pre-hook (``compileclip.hooks``) decides per step whether the step graph clips
(``Path.IN_GRAPH``) or the hook already did (then the graph runs with ``enabled=False``).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from . import clipmath
from .compiling import compile_graph
from .passes import grad_placeholders, guard_input_mutations, insert_step_clip

if TYPE_CHECKING:
    from .backend import ClipBackend
    from .runtime import ClipRuntime


def is_step_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is a Dynamo graph that takes gradients (``param.grad``) as inputs: the
    body of a compiled optimizer step."""
    return bool(grad_placeholders(gm))


def _frame_optimizers() -> list[torch.optim.Optimizer]:
    """The optimizers in the locals of the frame Dynamo is compiling (``self`` of ``step``)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = InstructionTranslator.current_tx().f_locals
    except (ImportError, AttributeError, RuntimeError, AssertionError):  # not under Dynamo
        return []
    return [v for v in f_locals.values() if isinstance(v, torch.optim.Optimizer)]


def _check_coverage(grad_inputs: list[torch.Tensor], optimizers: list[torch.optim.Optimizer]) -> None:
    """The norm must cover every gradient the optimizer updates with, as eager
    ``clip_grad_norm_`` over the optimizer's parameters does. A step split into several graphs
    would give each a partial norm: refuse that instead of clipping wrongly. Dynamo guards on
    which ``.grad`` are None, so a check at compile time holds for every run of the graph."""
    seen = {id(g) for g in grad_inputs}
    for opt in optimizers:
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
    """Calls the compiled step graph with the clip's runtime inputs (``max_norm``, the
    enabled flag, and where configured ``clip_value`` and the GradScaler's scale) and strips
    the two outputs it adds: the total norm (into the runtime, no host sync) and the
    nonfinite flag (GradScaler's ``found_inf``, and the skipped-step counter)."""

    def __init__(
        self, variants: dict, build, backend: ClipBackend, device: torch.device, optimizer,
        guarded: bool, initializing: bool = False, grad_params: tuple = (),
    ) -> None:
        # given_norm -> (compiled graph, its added outputs); the variant that takes the
        # backward's norm as an input is built by ``build`` when first needed (None: never)
        self.variants = variants
        self.build = build
        # this graph creates optimizer state (the first step): a skipped step must not keep it
        self.initializing = initializing and guarded
        # CUDA graphs reuse output buffers on the next replay: keep copies of ours
        from torch._inductor import config as inductor_config

        self.cudagraphs = bool(inductor_config.triton.cudagraphs)
        self.runtime = backend._runtime
        self.device = device
        self.optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self.guarded = guarded
        self.grad_params = grad_params  # per_param_norms: the parameter of each gradient input

    def __call__(self, *args: Any) -> Any:
        rt = self.runtime
        amp_state = None
        scale = None
        if rt.scaler is not None:
            amp_state, scale = _amp_begin(rt.scaler, self.optimizer, self.device)
        opt = self.optimizer() if self.optimizer is not None else None
        clip, handed = rt.take_step(opt)
        full = [*args, *rt.graph_inputs(self.device, clip, scale=scale)]
        given = handed is not None and self.build is not None
        if given:  # the backward graphs computed the norm of exactly these gradients
            full.append(handed)
            rt.stats["norm_from_backward"] += 1
        else:
            handed = None
        mon = rt.monitors.for_optimizer(opt)
        if mon.policy is not None:  # read only by the graph: updated after it, by ``finish``
            full.extend(mon.policy_state(self.device))
        if given not in self.variants:
            self.variants[given] = self.build(given, full)
        compiled, outputs = self.variants[given]
        state_before = None
        if self.initializing:  # the optimizer is known: compile_step requires it then
            state_before = {p: set(st) for p, st in opt.state.items()}
        # Dynamo calls what a backend returns with *args, whatever ``_boxed_call`` says
        # (aot_module_simplified's unboxed forward copies that attribute from its callee)
        outs = list(compiled(*full))
        if not outputs:
            return outs
        vals = dict(zip(outputs, outs[len(outs) - len(outputs):]))
        del outs[len(outs) - len(outputs):]
        if self.cudagraphs:
            vals = {k: v.clone() for k, v in vals.items()}
        nonfinite = vals["nonfinite"]
        if state_before is not None:
            self._drop_new_state_if_skipped(opt, state_before, nonfinite)
        total = vals.get("total_norm", handed)
        if clipmath.is_dtensor(total):  # FSDP2: replicated, the same on every rank
            total = total.full_tensor()
        if clip and rt.config.computes_norm:
            if "param_norms" in vals:
                mon.record_param_norms(vals["param_norms"], self.grad_params)
            thr = vals.get("threshold")
            rt.finish(total, rt.threshold_for(total, mon) if thr is None else thr, mon)
        if self.guarded:
            rt.count_skipped(nonfinite)
        if amp_state is not None:
            from torch.amp.grad_scaler import OptState

            amp_state["found_inf_per_device"][self.device] = nonfinite
            amp_state["stage"] = OptState.STEPPED
        return outs


    def _drop_new_state_if_skipped(self, opt, state_before: dict, nonfinite: torch.Tensor) -> None:
        """The graph of a step that creates optimizer state (SGD's momentum buffer, Adam's
        moments and step count) stores that state unguarded, where eager skips ``opt.step()``
        and has none. On a skipped step, the runtime removes what this step created at the
        next step's pre-hook (Dynamo installs the state after this call returns, and picks the
        next step's graph by it). Reading the flag syncs with the host: once, on the first
        step only (later steps run another graph)."""
        if bool(nonfinite):
            self.runtime.state_drops.append((weakref.ref(opt), state_before))


class _EagerClipThenStep:
    """``fuse=False``: the step graph without a clip; where no pre-hook clipped this step (its
    first call, before the graph registered the optimizer), an eager clip first."""

    def __init__(self, compiled, runtime: ClipRuntime, optimizer) -> None:
        self.compiled = compiled
        self.runtime = runtime
        self.optimizer = weakref.ref(optimizer) if optimizer is not None else None

    def __call__(self, *args: Any) -> Any:
        opt = self.optimizer() if self.optimizer is not None else None
        clip, _ = self.runtime.take_step(opt)
        if clip and opt is not None:
            self.runtime.clip_step(opt)
        return self.compiled(*args)


def _amp_begin(scaler, optimizer_ref, device: torch.device):
    """GradScaler bookkeeping before a compiled step with a scaler attached. Returns the
    optimizer's per-optimizer state to record ``found_inf`` into (None if ``unscale_``
    already ran: then the scaler has decided) and the scale to divide the gradients by."""
    from torch.amp.grad_scaler import OptState

    opt = optimizer_ref() if optimizer_ref is not None else None
    if opt is None:
        raise RuntimeError(
            "compileclip: a GradScaler is attached to this clip backend, but the compiled "
            "step's optimizer could not be identified; compile `opt.step` itself"
        )
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError(
            "compileclip: the optimizer already stepped since the last scaler.update(); call "
            "scaler.update() after each step (and do not call scaler.step(opt) as well)"
        )
    if state["stage"] is OptState.UNSCALED:
        # scaler.unscale_(opt) (or scaler.step(opt), which calls this step only when no
        # inf was found) already unscaled the gradients and recorded found_inf
        return None, torch.ones((), dtype=torch.float32, device=device)
    if scaler._scale is None:
        raise RuntimeError(
            "compileclip: the attached GradScaler has no scale yet: the loss must be scaled "
            "with scaler.scale(loss).backward() before the step"
        )
    return state, scaler._scale


# Every kernel of a clipped step reads the one clip coefficient. Inductor looks for fusions
# among the nodes that read a common buffer, pairwise within a window of this many, so the
# coefficient's group of n nodes costs n * window fusion checks per round (measured: SGD over
# 1024 tensors compiled in 189 s with the default 64, against 66 s without the clip). The
# nodes of one parameter share their own buffers in groups of a few nodes, which a window of 4
# still covers whole: the kernel counts of tests/test_kernel_counts.py stay those of the step
# without the clip plus a constant.
#
# Not ``emulate_precision_casts``: Inductor keeps the clipped gradient ``g * coef`` of a
# bf16/fp16 gradient in float32 inside the update's loop, where eager rounds it (in ``.grad``)
# first, so the parameters can differ by about one ulp per clipped step (see the warning in
# ``compile_step_graph``). Emulating the casts rounded inside ``add_(alpha=)`` too and made it
# worse (230 against 186 of 4096 bf16 elements off one ulp, measured), and an explicit
# cast or bitcast pair is removed by Inductor; float32 steps are not affected.
STEP_PATCHES = {"max_fusion_buffer_group_pairwise_attempts": 4}


def compile_step_graph(backend: ClipBackend, gm: fx.GraphModule, example_inputs: list[Any], patches: dict):
    """Compile a Dynamo step graph with the clip inserted (see the module docstring)."""
    config = backend.config
    rt = backend._runtime
    if config.error_if_nonfinite:
        # eager raises before the update; inside one step graph that needs a host sync
        # between the norm and the update, which would split the fused step
        raise NotImplementedError(
            "compileclip: error_if_nonfinite=True is not supported for a compiled optimizer "
            "step (it would raise after the parameters were updated). Use "
            "skip_nonfinite=True (skip the update on the device), or "
            "clip_grad_norm_(..., error_if_nonfinite=True) before an uncompiled-clip step."
        )
    grads = grad_placeholders(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    grad_positions = [placeholders.index(g) for g in grads]
    grad_inputs = [example_inputs[i] for i in grad_positions]
    optimizers = _frame_optimizers()
    _check_coverage(grad_inputs, optimizers)
    optimizer = optimizers[0] if len(optimizers) == 1 else None
    if optimizer is not None and is_fused(optimizer):
        # Dynamo runs the fused kernel eagerly: the step's pre-hook clips it
        return compile_graph(config.inner, gm, example_inputs, config_patches=patches)
    rt.graph_compiled()
    if optimizer is not None:
        rt.add_step_optimizer(optimizer)
    if rt.scaler is not None and any(g.dtype == torch.float16 for g in grad_inputs):
        # GradScaler.unscale_ refuses these too (allow_fp16=False): fp16 master weights
        # lose the small updates loss scaling exists to keep
        raise ValueError(
            "compileclip: a GradScaler is attached but the step's gradients include float16 "
            "ones; GradScaler.unscale_ refuses to unscale FP16 gradients. Keep the "
            "parameters in float32 and run the forward under torch.autocast"
        )
    if config.fuse and config.max_norm is not None and any(g.dtype in (torch.bfloat16, torch.float16) for g in grad_inputs):
        rt.warn_once(
            "low_precision_step",
            "the compiled step clips bfloat16/float16 gradients inside the optimizer's update, "
            "where Inductor keeps the clipped gradient in float32; eager rounds it to the "
            "gradient's dtype first. The parameters can differ from eager by about one ulp of "
            "that dtype per clipped step (measured: 2 of 32 bf16 weights at the first step), on "
            "top of Inductor's own rounding of the update. For eager's exact numbers keep float32 "
            "parameters (torch.autocast for the forward), or clip in the model only (no compile_step)",
        )
    # a graph traced while some parameter had no optimizer state yet creates it (SGD's
    # momentum buffer; Dynamo initializes Adam's moments before tracing, see the README)
    initializing = optimizer is not None and any(
        not optimizer.state.get(p) for group in optimizer.param_groups for p in group["params"]
        if p.grad is not None
    )
    if guarded_config(config, rt) and optimizer is None:
        raise NotImplementedError(
            "compileclip: skip_nonfinite=True or a GradScaler needs the compiled step to belong "
            f"to one optimizer; this step graph sees {len(optimizers)}. Compile each "
            "optimizer's step separately"
        )
    if not config.fuse:  # the step's pre-hook clips eagerly (records.choose_path)
        return _EagerClipThenStep(compile_graph(config.inner, gm, example_inputs, config_patches=patches), rt, optimizer)
    device = grad_inputs[0].device
    amp = rt.scaler is not None
    patches = {**STEP_PATCHES, **patches}  # the user's options win
    guarded = guarded_config(config, rt)
    # one clip object for model and step: a variant that takes the backward graphs' norm
    use_given = bool(len(rt.params)) and (config.computes_norm or amp) and optimizer is not None
    mon = rt.monitors.for_optimizer(optimizer)
    states = mon.policy_state(device) if mon.policy is not None else []
    grad_params: tuple = ()
    if mon.per_param:  # the example inputs are the .grad tensors, in the graph's order
        by_grad = {id(p.grad): p for o in optimizers for group in o.param_groups for p in group["params"]
                   if p.grad is not None}
        grad_params = tuple(weakref.ref(by_grad[id(t)]) for t in grad_inputs)

    def build(given_norm: bool, graph_inputs: list[Any] | None = None):
        """Compile one variant. ``graph_inputs``: the real inputs of a call, for a variant
        compiled when a later step first needs it (outside Dynamo's tracing)."""
        g = _copy_dynamo_graph(gm)
        insertion = insert_step_clip(
            g, grad_placeholders(g), config.norm_type,
            clip_norm=config.max_norm is not None,
            compute_norm=guarded,
            clip_value=config.clip_value is not None,
            unscale=amp,
            given_norm=given_norm,
            write_grad=config.step_writes_grad,
            policy=None if mon.policy is None else (mon.policy.kind, mon.policy.params, states),
            agc=None if mon.agc is None else (mon.agc.clipping, mon.agc.eps),
            parts=mon.per_param and not given_norm,
        )
        if graph_inputs is not None:
            inputs = list(graph_inputs)
        else:
            inputs = [*example_inputs, *rt.graph_inputs(device, True)]
            if given_norm:
                inputs.append(torch.zeros((), dtype=torch.float32, device=device))
            inputs.extend(states)
        n_dynamo = len(inputs)

        def guard(inner: fx.GraphModule, inner_inputs: list[Any]) -> None:
            # AOTAutograd puts the graph module's own parameters and buffers (the optimizer
            # state Dynamo installed as attributes) before the Dynamo placeholders
            offset = len(inner_inputs) - n_dynamo
            if offset < 0:
                raise RuntimeError("compileclip: unexpected inputs of the compiled step graph")
            # the nonfinite flag, counted from the end (the clip's outputs come last)
            flag = insertion.outputs.index("nonfinite") - len(insertion.outputs)
            guard_input_mutations(inner, flag, exclude=[offset + i for i in grad_positions])

        return compile_graph(config.inner, g, inputs, forward_rewrite=guard if guarded else None, config_patches=patches), insertion.outputs

    # Compile the variant this step needs now; the other one (with or without the handed
    # norm) only when a later step first needs it: compiling both up front doubled the
    # step's compile time, and most loops only ever use one.
    rec = rt.open_step
    first = use_given and rec is not None and rec.handed_norm is not None
    variants: dict[bool, Any] = {first: build(first)}
    return _ClippedStep(variants, build if use_given else None, backend, device, optimizer, guarded, initializing,
                        grad_params)


def guarded_config(config, rt) -> bool:
    """Whether steps are skipped on a nonfinite norm (the skip policy, or GradScaler's)."""
    return config.skip_nonfinite or rt.scaler is not None



def is_fused(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` runs a fused kernel, which Dynamo does not trace (``fused=True``)."""
    return any(group.get("fused") for group in opt.param_groups) or bool(opt.defaults.get("fused"))


class CompiledStep:
    """What ``clip.compile_step(opt)`` returns: call it as ``opt.step``. Dynamo's recompile
    limit raises here instead of silently running the step uncompiled (and unclipped, as the
    pre-hook left the clip to the graph); the step is then run eagerly, clipped by the hook."""

    def __init__(self, optimizer, compiled, runtime: ClipRuntime) -> None:
        self.optimizer = optimizer
        self.compiled = compiled  # None: a fused optimizer, stepped eagerly
        self.runtime = runtime

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.optimizer.step(*args, **kwargs)
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return self.compiled(*args, **kwargs)
        except FailOnRecompileLimitHit:
            self.runtime.abort_step()
            self.runtime.stats["step_recompile_limit"] += 1
            return self.optimizer.step(*args, **kwargs)
