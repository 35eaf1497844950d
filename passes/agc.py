"""AGC (unit-wise adaptive gradient clipping, NFNets) inside a Dynamo step graph: the factor
of each gradient against its parameter, and where the parameters are in the graph."""

from __future__ import annotations

import torch
import torch.fx as fx

EPS = 1e-6  # the floor of a unit's gradient norm (as eager clip_grad_norm_'s epsilon)


def agc_factor(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """AGC's factor for the gradient ``g`` of ``w`` (in ``g``'s dtype, broadcastable to it):
    1 where a unit's gradient norm is below ``clipping * max(||w_unit||, eps)``, that bound
    over the norm elsewhere; a unit is a slice along dim 0 for ``ndim >= 2``, else the whole
    tensor, norms in float32. The eager clip calls it (``clipmath.agc_``) and the step pass
    traces it into the graph: one function, one arithmetic."""
    if w.ndim <= 1:
        wn = torch.linalg.vector_norm(w, dtype=torch.float32)
        gn = torch.linalg.vector_norm(g, dtype=torch.float32)
    else:
        dims = tuple(range(1, w.ndim))
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=torch.float32)
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=torch.float32)
    bound = torch.clamp(wn, min=eps) * clipping
    return torch.where(gn < bound, 1.0, bound / torch.clamp(gn, min=EPS)).to(g.dtype)


def param_nodes(gm: fx.GraphModule, grads: list[fx.Node], first: fx.Node) -> list[fx.Node]:
    """The parameter of each gradient placeholder: the graph's placeholder or attribute whose
    source is the gradient's ``GradSource.base``. New ``get_attr`` nodes are made at the top of
    the graph (before any update), so that they read the parameter as the step found it."""
    by_source = {}
    for n in gm.graph.find_nodes(op="placeholder"):
        src = getattr(n, "_dynamo_source", None)
        if src is not None:
            by_source[src] = n
    attrs = {src: name for name, src in getattr(gm, "_param_name_to_source", {}).items()}
    out = []
    for g in grads:
        src = getattr(getattr(g, "_dynamo_source", None), "base", None)
        if src in by_source:
            out.append(by_source[src])
        elif src in attrs:
            with gm.graph.inserting_before(first):
                node = gm.graph.get_attr(attrs[src])
            val = getattr(gm, attrs[src])
            gval = g.meta.get("example_value")
            fake_mode = getattr(gval, "fake_mode", None)
            if fake_mode is not None:
                node.meta["example_value"] = fake_mode.from_tensor(val, static_shapes=True)
            out.append(node)
        else:
            raise NotImplementedError(
                f"compileclip: AGC in a compiled step could not find the parameter of gradient "
                f"{g.name} in the step graph; clip with AGC eagerly (compile the model only)"
            )
    return out
