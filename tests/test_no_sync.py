"""Not one host sync during a step, with every monitoring option and every adaptive policy.

After the first steps (which compile, and Inductor may read tensors then), every way a tensor
reaches the host in Python raises: ``Tensor.item``, ``__bool__``, ``__float__``, ``__int__``,
``tolist``. The clip's decisions (a policy's warm-up ending, a spike, AGC's per-unit choice)
must all stay on the device. SGD with momentum reads nothing on the host itself (Adam's eager
step reads its step count with ``item``, which is the optimizer's, not ours). With CUDA, the
same loop also runs under ``torch.cuda.set_sync_debug_mode("error")``, which catches syncs
that do not go through Python (a ``nonzero``, a copy to the host).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import models
from compileclip import AGC, Percentile, ZScore
from harness import isolated, new_clip  # noqa: F401

_READS = ("item", "__bool__", "__float__", "__int__", "tolist")

OPTIONS = {
    "fixed": dict(max_norm=0.05, history=6, per_param_norms=True),
    "percentile": dict(max_norm=Percentile(q=0.5, window=4, warmup=2, warmup_max_norm=0.05), history=6),
    "zscore": dict(max_norm=ZScore(warmup=3, max_norm=10.0), history=6, per_param_norms=True),
    "agc": dict(max_norm=AGC(clipping=0.01), history=6),
}


@contextlib.contextmanager
def no_host_reads(device: str):
    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} during a step: a host sync")
        return read

    saved = {name: getattr(torch.Tensor, name) for name in _READS}
    for name in _READS:
        setattr(torch.Tensor, name, refuse(name))
    debug = torch.cuda.get_sync_debug_mode() if device == "cuda" else None
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(debug)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mode", ["backward", "step", "both"])
def test_no_host_sync_during_steps(mode, option, device):
    torch.manual_seed(0)
    model = models.mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    clip = new_clip(**OPTIONS[option])
    forward = torch.compile(model, backend=clip) if mode != "step" else model
    step = torch.compile(opt.step, backend=clip) if mode != "backward" else opt.step
    xs = [torch.randn(6, 8, device=device) for i in range(10)]
    spike = {7: 40.0}  # the loss scaled up at that step: its gradient norm 40x

    def one_step(i, x):
        (forward(x).pow(2).mean() * spike.get(i, 1.0)).backward()
        step()
        opt.zero_grad()

    for i in range(2):  # compiles (the step graph's first call, the backward's first run)
        one_step(i, xs[i])
    with no_host_reads(device):
        for i in range(2, 10):  # a policy's warm-up ends here, and step 8 is a spike
            one_step(i, xs[i])
        clip.total_norm, clip.threshold, clip.history, clip.thresholds  # noqa: B018
        if clip.config.per_param_norms:
            clip.named_norms(model)
    # the loop did clip: the spike's norm is in the history and was above its threshold
    assert clip.history.numel() == 6
    norms, thrs = clip.history.tolist(), clip.thresholds.tolist()
    assert norms[-3] > 10 * sorted(norms)[2], norms
    if option != "agc":
        assert norms[-3] > thrs[-3], (norms, thrs)
    clip.suggest_max_norm()  # the one call that reads on the host
