"""The adaptive thresholds' arithmetic, on device tensors, with no host sync.

A policy (``compileclip.policies``) is a ``kind`` and a list of float ``params``; its state is a
list of device tensors (``init_state``). Per step:

    thr = threshold(kind, params, total, state)     # pure: reads the state before this step
    update_(kind, params, total, state)             # after the clip, in place

``threshold`` is also the operator ``compileclip::threshold`` (``compileclip.ops``), which the
step graph calls after the total norm: the graph and the eager clip call the same function, so
their thresholds are the same bits. Everything is ``torch.where`` on
0-d tensors: the branches of the policies never reach the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_F32 = torch.float32


def init_state(kind: str, params: Sequence[float], device: torch.device) -> list[torch.Tensor]:
    if kind == "percentile":
        window = int(params[1])
        # the last ``window`` finite norms (nan: empty), and how many finite norms were seen
        return [torch.full((window,), math.nan, dtype=_F32, device=device),
                torch.zeros((), dtype=torch.int64, device=device)]
    if kind == "zscore":
        warmup = int(params[2])
        # the warm-up's finite norms, how many, the EMA mean and variance
        return [torch.full((warmup,), math.nan, dtype=_F32, device=device),
                torch.zeros((), dtype=torch.int64, device=device),
                torch.zeros((), dtype=_F32, device=device),
                torch.zeros((), dtype=_F32, device=device)]
    raise ValueError(f"unknown threshold policy {kind!r}")


def _percentile_window(params, total, state) -> tuple[torch.Tensor, torch.Tensor]:
    """The window with this step's norm in the slot of the oldest one (a nonfinite norm leaves
    it as it is), and whether this norm is finite."""
    buf, count = state
    finite = torch.isfinite(total)
    pos = torch.remainder(count, buf.numel())
    slots = torch.arange(buf.numel(), device=buf.device)
    return torch.where((slots == pos) & finite, total, buf), finite


def _zscore_spike(params, total, state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ready: the statistics exist, z > z_thr, the spike's threshold mu + z_thr sigma / (z / z_thr))."""
    z_thr, _, warmup, _, eps = params
    _, n, mean, var = state
    sigma = torch.sqrt(var)
    z = (total - mean) / (sigma + eps)
    spike_thr = mean + (z_thr * sigma) / (z / z_thr)
    return n >= int(warmup), z > z_thr, spike_thr


def threshold(kind: str, params: Sequence[float], total: torch.Tensor, state: Sequence[torch.Tensor]) -> torch.Tensor:
    """This step's threshold (0-d float32, ``inf``: no clipping) from the state before it."""
    total = total.to(_F32)
    if kind == "percentile":
        q, _, warmup, warm_max = params
        window, finite = _percentile_window(params, total, state)
        quant = torch.nanquantile(window, q)
        quant = torch.where(torch.isnan(quant), math.inf, quant)  # no finite norm yet
        # state[1]: the finite norms seen before; the warm-up lasts ``warmup`` finite norms
        return torch.where(state[1] + finite.to(state[1].dtype) <= int(warmup), warm_max, quant)
    if kind == "zscore":
        cap = params[3]
        ready, spike, spike_thr = _zscore_spike(params, total, state)
        adaptive = torch.where(spike, spike_thr, math.inf)
        return torch.clamp(torch.where(ready, adaptive, math.inf), max=cap)
    raise ValueError(f"unknown threshold policy {kind!r}")


def update_(kind: str, params: Sequence[float], total: torch.Tensor, state: Sequence[torch.Tensor]) -> None:
    """Take this step's pre-clip norm ``total`` into the statistics (in place, on the device)."""
    total = total.to(_F32)
    if kind == "percentile":
        window, finite = _percentile_window(params, total, state)
        state[0].copy_(window)
        state[1].add_(finite.to(state[1].dtype))
        return
    if kind == "zscore":
        _, alpha, warmup, _, _ = params
        buf, n, mean, var = state
        finite = torch.isfinite(total)
        ready, spike, spike_thr = _zscore_spike(params, total, state)
        # the warm-up collects finite norms; the step of the last one starts the statistics
        slot = torch.clamp(n, max=buf.numel() - 1)
        collect = finite & ~ready
        buf.index_copy_(0, slot.view(1), torch.where(collect, total, buf.index_select(0, slot.view(1))[0]).view(1))
        new_n = n + collect.to(n.dtype)
        starts = collect & (new_n >= int(warmup))
        mean0 = buf.mean()
        var0 = ((buf - mean0) ** 2).mean()
        # the EMA, with the clipped norm
        x = torch.where(spike, spike_thr, total)
        ema_mean = alpha * mean + (1 - alpha) * x
        ema_var = alpha * var + (1 - alpha) * (x - ema_mean) ** 2
        step = ready & finite
        mean.copy_(torch.where(starts, mean0, torch.where(step, ema_mean, mean)))
        var.copy_(torch.where(starts, var0, torch.where(step, ema_var, var)))
        n.copy_(new_n)
        return
    raise ValueError(f"unknown threshold policy {kind!r}")
