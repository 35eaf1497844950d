"""What the backward pass (aten level) and the step pass (torch level) share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

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
