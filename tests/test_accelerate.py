"""Accelerate's recipe (README): the model compiled with the clip before ``prepare``, no
``accelerator.clip_grad_norm_``, against the same loop clipping with
``accelerator.clip_grad_norm_`` on the sync steps, with gradient accumulation 2. Both models
run eager's kernels (``aot_eager``): parameters, consumed gradients and norms bit for bit. Clip
active and inactive; plus the registered backend name (``backend="compileclip"``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402

import compileclip  # noqa: E402
from compileclip import clip_backend  # noqa: E402

ACTIVE, INACTIVE = 0.05, 1e6
BATCHES = 8


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def loop(max_norm: float, backend, clip_eagerly: bool):
    model = net()
    run = torch.compile(model, **backend)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    ds = torch.utils.data.TensorDataset(torch.randn(BATCHES * 4, 8, generator=g), torch.randn(BATCHES * 4, 1, generator=g))
    run, opt, dl = acc.prepare(run, opt, torch.utils.data.DataLoader(ds, batch_size=4))
    consumed, norms = [], []
    for x, y in dl:
        with acc.accumulate(run):
            acc.backward((run(x) - y).pow(2).mean())
            if acc.sync_gradients and clip_eagerly:
                norms.append(acc.clip_grad_norm_(model.parameters(), max_norm))
            opt.step()
            if acc.sync_gradients:
                consumed.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.zero_grad()
    return model, consumed, norms, run


def compare(ours, ref) -> None:
    assert len(ours[1]) == len(ref[1]) == BATCHES // 2
    for k, (g, r) in enumerate(zip(ours[1], ref[1])):
        for n in r:
            torch.testing.assert_close(g[n], r[n], rtol=0, atol=0, msg=f"step {k}: consumed .grad of {n}")
    for (n, p), q in zip(ours[0].named_parameters(), ref[0].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"parameter {n}")


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE])
def test_accelerate_accumulation_matches_its_own_clip(max_norm):
    ref = loop(max_norm, dict(backend="aot_eager"), clip_eagerly=True)
    clip = clip_backend(max_norm=max_norm, inner="aot_eager", history=BATCHES)
    ours = loop(max_norm, dict(backend=clip), clip_eagerly=False)
    compare(ours, ref)
    assert torch.equal(clip.history, torch.stack(ref[2]))  # the pre-clip norm of every step
    assert all((float(n) > max_norm) == (max_norm == ACTIVE) for n in ref[2])


def test_backend_by_name_with_a_handle():
    """``torch.compile(..., backend="compileclip", options=...)`` through the entry point, and
    ``compileclip.clip_of`` for the clip behind it."""
    assert "compileclip" in torch._dynamo.list_backends(exclude_tags=())
    ref = loop(ACTIVE, dict(backend="aot_eager"), clip_eagerly=True)
    options = {"max_norm": ACTIVE, "inner": "aot_eager", "history": BATCHES}
    ours = loop(ACTIVE, dict(backend="compileclip", options=options), clip_eagerly=False)
    compare(ours, ref)
    clip = compileclip.clip_of(ours[3])
    assert clip is options["clip"]
    assert torch.equal(clip.history, torch.stack(ref[2]))


def test_backend_by_name_when_dynamo_compiles_no_graph():
    """``nn.Linear.compile(...)``: Dynamo up to torch 2.13 skips torch.nn's own frames, so the
    backend never runs; the clip that ``clip_of`` made finds its module through the wrapper and
    clips the step eagerly (with a warning), as for ``backend=clip``. Torch 2.15 compiles a
    graph. Either way the step is eager's."""
    torch.manual_seed(0)
    lin, ref = nn.Linear(8, 8), nn.Linear(8, 8)
    ref.load_state_dict(lin.state_dict())
    options = {"max_norm": ACTIVE, "inner": "aot_eager"}
    lin.compile(backend="compileclip", options=options)
    clip = compileclip.clip_of(lin)
    x = torch.randn(4, 8)
    for model in (lin, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).pow(2).sum().backward()
        if model is ref:
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compiled no graph")
            opt.step()
    assert torch.equal(clip.total_norm, norm) and float(norm) > ACTIVE
    for p, q in zip(lin.parameters(), ref.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


def test_backend_by_name_needs_max_norm():
    from compileclip.registry import clip_for

    with pytest.raises(ValueError, match="needs options=.*max_norm"):
        clip_for(None)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_nrom'\]"):
        clip_for({"max_norm": 1.0, "max_nrom": 2.0})
    with pytest.raises(ValueError, match="was not compiled with a compileclip clip"):
        compileclip.clip_of(torch.compile(net(), backend="aot_eager"))
