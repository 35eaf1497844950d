"""An optimizer step that raises after the clip's pre-hook (an out-of-memory error in the
optimizer, a hook of the user's) leaves the clip's step open: torch runs no post-hook. The
optimizer's own next step closes it (``test_scope_2.py``); so does a step of another
optimizer that cannot be nested in it (a retry with a new optimizer, a batch-size finder),
which used to pass for a nested step and went unclipped for good. The open step holds no
gradient (an out-of-memory retry must be able to free them)."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

from harness import ACTIVE, INACTIVE, isolated, mlp, new_clip  # noqa: F401


def _boom(*_):
    raise RuntimeError("boom")


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_a_new_optimizer_after_a_raised_step_is_clipped(max_norm):
    def run(eager: bool):
        torch.manual_seed(0)
        model = mlp()
        clip = None if eager else new_clip(max_norm=max_norm, inner="aot_eager")
        fwd = model if eager else torch.compile(model, backend=clip)
        first = torch.optim.SGD(model.parameters(), lr=0.1)
        first.register_step_pre_hook(_boom)
        torch.manual_seed(100)
        F.mse_loss(fwd(torch.randn(6, 8)), torch.randn(6, 4)).backward()
        with pytest.raises(RuntimeError, match="boom"):
            first.step()
        del first
        gc.collect()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the retry
        out = []
        for i in range(3):
            torch.manual_seed(200 + i)
            opt.zero_grad(set_to_none=True)
            F.mse_loss(fwd(torch.randn(6, 8)), torch.randn(6, 4)).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if eager else None
            opt.step()
            out.append((norm if eager else clip.total_norm.clone(), [p.grad.clone() for p in model.parameters()],
                        [p.detach().clone() for p in model.parameters()]))
        return out

    ref = run(eager=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run(eager=False)
    for i, ((n, gs, ps), (m, hs, qs)) in enumerate(zip(ref, got)):
        assert torch.equal(n, m), (i, n, m)
        assert all(torch.equal(a, b) for a, b in zip(gs + ps, hs + qs)), i


def test_a_raised_step_holds_no_gradient():
    torch.manual_seed(0)
    model = mlp()
    clip = new_clip(max_norm=ACTIVE, inner="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_pre_hook(_boom)
    F.mse_loss(torch.compile(model, backend=clip)(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)
