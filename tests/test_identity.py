"""Which gradient is which: by tensor object and version counter, never by address.

After a clip, the group's gradients are marked (``runtime.mark_clipped``), so that a second
optimizer of the group finds them clipped. A ``.grad`` replaced between the two steps by
another tensor is a gradient no clip has seen, even where the new tensor sits at the old one's
address with the same version count (memory the allocator reused). Here the new tensor aliases
the old one's storage, which makes the address equal for sure; a fresh tensor with the same
values and version is the control. Both must train the same, and as the eager loop that clips
before each of the two steps (``clip_grad_norm_`` over the group right before the first step
that consumes a gradient: the replaced one's is the second optimizer's).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from harness import ACTIVE, INACTIVE, isolated, new_clip  # noqa: F401


def _replacement(old: torch.Tensor, values: torch.Tensor, alias: bool) -> torch.Tensor:
    """A new tensor holding ``values``, with ``old``'s version count; at ``old``'s address
    (``alias``) or elsewhere."""
    if alias:
        new = torch.empty(0, dtype=old.dtype).set_(old.untyped_storage(), old.storage_offset(), old.size(), old.stride())
        new.data.copy_(values)  # .data: a write that moves no version counter
    else:
        new = values.clone()
    while new._version < old._version:
        new.mul_(1.0)
    assert new._version == old._version
    return new


def _run(max_norm: float, how: str, steps: int = 3) -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    clip = None if how == "eager" else new_clip(max_norm=max_norm, inner="aot_eager")
    run = model if clip is None else torch.compile(model, backend=clip)
    params = list(model.parameters())
    kept, trace = [], []
    for i in range(steps):
        torch.manual_seed(100 + i)
        x = torch.randn(6, 8)
        model.zero_grad(set_to_none=True)
        run(x).square().mean().backward()
        if clip is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt_a.step()
        w = model[2].weight
        old, values = w.grad, torch.randn_like(w.grad)
        new = _replacement(old, values, alias=how == "alias")
        if how == "alias":
            assert new.data_ptr() == old.data_ptr()
        else:
            kept.append(old)  # the control: the old tensor stays alive, so its address is taken
        w.grad = new
        del old
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if clip is None else None
        opt_b.step()
        norm = clip.total_norm.clone() if clip is not None else norm
        trace.append([p.detach().clone() for p in params] + [p.grad.clone() for p in model[2].parameters()] + [norm])
    return trace


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_a_gradient_at_a_marked_gradients_address_is_not_taken_as_clipped(max_norm):
    eager, fresh, alias = _run(max_norm, "eager"), _run(max_norm, "fresh"), _run(max_norm, "alias")
    for step, (e, f, a) in enumerate(zip(eager, fresh, alias)):
        for k, (x, y, z) in enumerate(zip(e, f, a)):
            assert torch.equal(y, z), f"step {step}, tensor {k}: the aliasing gradient trained differently"
            torch.testing.assert_close(y, x, msg=lambda m: f"step {step}, tensor {k} against eager: {m}")
