"""The clip adds a constant number of kernels, however many parameter tensors there are.

A stack of ``Linear(4, 4)`` layers with 16, 256 and 1024 parameter tensors, compiled with and
without the clip: the backward of the model (``torch.compile(model, backend=clip)``), and
the optimizer step (``clip.compile_step(opt)`` against ``torch.compile(opt.step)``). Kernels
are counted as Inductor generates them on CPU: C++ loop nests
(``metrics.generated_kernel_count``) and extern calls in the generated wrapper (the norms are
one call of ``compileclip::grad_norms`` in a backward, of ``compileclip::norms_and_total`` in a
step, see ``compileclip/ops.py``).

Measured on torch 2.13 (CPU), the same for 16, 256 and 1024 tensors:
- model (forward + backward): +0 loop nests, +1 extern call (the norm);
- step: +1 loop nest (coefficient and nonfinite flag, on 0-d tensors), +1 extern call;
the scale and the write-back into ``.grad`` are computed inside the optimizer's own loops.
A reduction per gradient would add e.g. +258 loop nests in the step for 256 tensors (an
earlier version did). The counts also hold on 2.11 and 2.15 (checked with the suite there).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn as nn
from torch._inductor import metrics
from torch._inductor.utils import run_and_get_code

from compileclip import ZScore, clip_backend

EXTERN = re.compile(r"\bextern_kernels\.\w+\(|\btorch\.ops\.\w+\.\w+\.\w+\(")

# what the clip adds: (loop nests, extern calls)
EXTRA = {"model": (0, 1), "step": (1, 1)}


def _model(n_tensors: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_tensors // 2)])


def _count(fn) -> tuple[int, int]:
    metrics.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        _, sources = run_and_get_code(fn)
    return metrics.generated_kernel_count, sum(len(EXTERN.findall(src)) for src in sources)


def kernels(kind: str, n_tensors: int, clipped: bool, **options) -> tuple[int, int]:
    """(loop nests, extern calls) of one compile of the model's forward+backward or of SGD's
    step over ``n_tensors`` gradients."""
    torch._dynamo.reset()
    model = _model(n_tensors)
    x = torch.randn(2, 4)
    clip = clip_backend(**{"max_norm": 1.0, **options}) if clipped else None
    if kind == "model":
        compiled = torch.compile(model, backend=clip if clipped else "inductor")
        return _count(lambda: compiled(x).pow(2).mean().backward())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    model(x).pow(2).mean().backward()
    step = clip.compile_step(opt) if clipped else torch.compile(opt.step)
    return _count(step)


@functools.lru_cache(maxsize=None)
def plain_kernels(kind: str, n_tensors: int) -> tuple[int, int]:
    """``kernels`` without the clip, once per process (several tests compare against it)."""
    return kernels(kind, n_tensors, clipped=False)


@pytest.mark.parametrize("n_tensors", [16, 256, 1024])
@pytest.mark.parametrize("kind", ["model", "step"])
def test_clip_adds_constant_kernels(kind, n_tensors):
    plain = plain_kernels(kind, n_tensors)
    with_clip = kernels(kind, n_tensors, clipped=True)
    extra = (with_clip[0] - plain[0], with_clip[1] - plain[1])
    assert extra == EXTRA[kind], (plain, with_clip)
    assert sum(extra) <= 4  # the bound per (device, dtype) group the design promises


# The per-parameter norms come out of the same operator call, the history is written
# outside the graphs, and an adaptive policy's threshold is one more extern call in the step
# (``compileclip::threshold``). Measured the same at 16 and 256 tensors; checked at 16 (a
# kernel per gradient would add 16 or more there; AGC's unit norms, two reductions per
# parameter, add 33 at 16 and 513 at 256 loop nests).
OPTIONS = {
    "per_param_history": ({"per_param_norms": True, "history": 8}, {"model": (0, 1), "step": (1, 1)}),
    "zscore": ({"max_norm": ZScore()}, {"model": (0, 1), "step": (1, 2)}),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", ["model", "step"])
def test_monitoring_and_policies_add_constant_kernels(kind, option):
    options, extra = OPTIONS[option]
    plain = plain_kernels(kind, 16)
    with_clip = kernels(kind, 16, clipped=True, **options)
    assert (with_clip[0] - plain[0], with_clip[1] - plain[1]) == extra[kind], (plain, with_clip)


if __name__ == "__main__":
    print(f"torch {torch.__version__}: (loop nests, extern calls), plain -> with the clip")
    for kind in ("model", "step"):
        for n in (16, 256, 1024):
            print(f"{kind:6} {n:5d} tensors: {kernels(kind, n, False)} -> {kernels(kind, n, True)}")
