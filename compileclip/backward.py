"""The model's graphs: the norm of each gradient added to the partitioned backward graph, and the
wrapper that records it with the gradients it covers (``ClipRuntime.record_run``).

The gradients themselves are left as they are: only the optimizer step knows whether they are
final. The norm is ``compileclip::grad_norms`` (one extern kernel per device and dtype, eager's
``_foreach_norm``), which reads the gradients as the graph returns them, bf16/fp16 ones after
their rounding, as eager reads ``.grad`` (an Inductor reduction fused into the producer read
them before rounding: 2.9e-5 apart on a bf16 MLP).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.fx as fx

from . import clipmath, identity, instances
from .instances import GraphLeaves
from .passes import GraphSignature, insert_grad_norm, output_values
from .runtime import ClipRuntime


def grad_outputs(gm: fx.GraphModule, leaf_idx: dict[int, Any]) -> list[tuple[int, int]]:
    """(backward output position, Dynamo input index) of each trainable leaf's gradient, from
    the output's ``GradAOTOutput(grad_of=PlainAOTInput(idx))`` descriptors."""
    out = gm.graph.output_node() if hasattr(gm.graph, "output_node") else next(
        n for n in reversed(gm.graph.nodes) if n.op == "output")
    descs = out.meta.get("desc")
    pairs = []
    for pos, node in enumerate(out.args[0]):
        if not isinstance(node, fx.Node):
            continue
        idx = getattr(getattr(descs[pos], "grad_of", None), "idx", None) if descs is not None else pos
        if idx in leaf_idx:
            pairs.append((pos, idx))
    return pairs


def norm_in_backward(rt: ClipRuntime, leaf_idx: dict[int, Any], leaves: GraphLeaves, gm: fx.GraphModule,
                     example_inputs, *, patches):
    """A ``compiling.compile_graph`` backward rewrite: the norms, and a recording wrapper."""
    positions = grad_outputs(gm, leaf_idx)
    if not positions:
        return example_inputs, lambda compiled: compiled
    vals = output_values(gm, [pos for pos, _ in positions])
    groups = clipmath.group_positions(vals)
    p = rt.config.norm_type
    device = vals[0].device
    inputs = {}
    if rt.scaler is not None:
        inputs["inv_scale"] = torch.empty((), dtype=torch.float32, device=device)

    def norms(grads, inp):
        pieces = clipmath.norms_by_group(grads, groups, p, inp.get("inv_scale"))
        return {f"norms_{k}": piece for k, piece in enumerate(pieces)}

    sig = insert_grad_norm(gm, [pos for pos, _ in positions], norms, inputs=inputs)
    order = [positions[i] for pos in groups for i in pos]  # the order of the concatenated norms
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    with fake_mode:
        extra = [torch.empty((), dtype=torch.float32, device=device) for _ in sig.inputs]
    cudagraphs = bool(patches.get("triton.cudagraphs", False))

    def wrap(compiled):
        return NormRecordingBackward(compiled, rt, sig, device, order, leaf_idx, leaves, cudagraphs)

    return [*example_inputs, *extra], wrap


class NormRecordingBackward:
    """Calls the compiled backward (with the GradScaler's inverse scale where one is attached),
    strips the norms it returns and records them with the gradients they cover."""

    def __init__(self, compiled, runtime: ClipRuntime, sig: GraphSignature, device, order, leaf_idx,
                 leaves: GraphLeaves, cudagraphs: bool) -> None:
        self._boxed_call = True  # an instance attribute: AOTAutograd copies __dict__
        self.compiled = compiled
        self.runtime = runtime
        self.sig = sig
        self.device = device
        self.positions = [pos for pos, _ in order]  # output position of each norm's gradient
        self.params = tuple(weakref.ref(leaf_idx[idx]) for _, idx in order)  # at compile time
        self.inputs = tuple(idx for _, idx in order)  # the Dynamo input index of each
        self.leaves = leaves
        self.cudagraphs = cudagraphs

    def __call__(self, args: list[Any]) -> Any:
        rt = self.runtime
        values = {}
        if "inv_scale" in self.sig.inputs:
            values["inv_scale"] = clipmath.inverse_scale(rt.scale_on(self.device))
        full = self.sig.bind(args, values)
        args.clear()  # boxed convention: the callee owns the inputs
        outs, added = self.sig.split(list(self.compiled(full)))
        pieces = list(added.values())
        if self.cudagraphs:  # the next replay overwrites them
            pieces = [t.clone() for t in pieces]
        grads = [outs[pos] for pos in self.positions]
        params = self.params
        run = instances.run_leaves() if self.leaves.multi else None
        if run is not None:  # the graph ran with another module's parameters (``instances.py``)
            params = tuple(run.get(i, r) for i, r in zip(self.inputs, params))
        if identity.has_none(grads):  # a leaf that got no gradient this time
            keep = [g is not None for g in grads]
            mixed = len(pieces) > 1  # one piece now, of several devices or dtypes
            flat = torch.cat([p.to(pieces[0].device) for p in pieces]) if mixed else pieces[0]
            pieces = [flat[torch.tensor([i for i, k in enumerate(keep) if k], device=flat.device)]]
            rt.record_run(pieces, tuple(r for r, k in zip(params, keep) if k), [g for g in grads if g is not None],
                          mixed=mixed)
        else:
            rt.record_run(pieces, params, grads)
        return outs
