"""Eager reference implementations of the adaptive clipping policies.

Written from the papers' formulas as compileclip's policies state them, in plain eager PyTorch
(host reads allowed: these are references, not the library). Every reference has

    clip_(params) -> (total_norm, threshold)

which takes the pre-clip total norm ``g`` of the gradients with ``get_total_norm`` (what eager
``clip_grad_norm_`` returns), decides the step's threshold from the norms seen so far (steps
are counted from 1) and clips with ``clip_grad_norm_(params, threshold)``:
``grads *= clamp(thr / (g + 1e-6), max=1)``; ``thr = inf`` clips nothing. Nonfinite norms never
enter a policy's statistics. AGC clips unit-wise instead and has no threshold (nan).

The statistics are kept in Python floats (float64), the quantile in a float64 tensor: the
library's float32 device arithmetic must agree to float32 tolerance.
"""

from __future__ import annotations

import math

import torch

INF = math.inf


def _with_grads(params) -> list[torch.Tensor]:
    return [p for p in params if p.grad is not None]


class _NormPolicy:
    """A policy that turns the step's pre-clip total norm into a threshold for clip_grad_norm_."""

    def threshold(self, g: float) -> float:
        raise NotImplementedError

    def clip_(self, params) -> tuple[torch.Tensor, float]:
        params = _with_grads(params)
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        thr = self.threshold(float(total))
        torch.nn.utils.clip_grad_norm_(params, thr)
        return total, thr


class FixedRef(_NormPolicy):
    """A constant max_norm: plain eager ``clip_grad_norm_(params, max_norm)``."""

    def __init__(self, max_norm: float):
        self.max_norm = float(max_norm)

    def threshold(self, g: float) -> float:
        return self.max_norm


class PercentileRef(_NormPolicy):
    """AutoClip: Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping
    for Source Separation Networks", MLSP 2020.

    eta_c(t) = p-th percentile of G_h(t) = {||g_1||, ..., ||g_t||}: the history INCLUDES the
    current step's norm. With the API's warm-up and window, counted in finite norms
    (a nonfinite norm, e.g. a GradScaler overflow, is not part of G_h at all):

    - until ``warmup`` finite norms were seen (this one included): thr = warmup_max_norm
      (inf if None)
    - after: thr = torch.quantile(the last ``window`` finite norms, q), linear interpolation,
      the current norm included (inf if there is none)
    """

    def __init__(self, q: float, window: int = 1000, warmup: int = 25, warmup_max_norm: float | None = None):
        self.q, self.window, self.warmup = q, window, warmup
        self.warmup_max_norm = INF if warmup_max_norm is None else float(warmup_max_norm)
        self.norms: list[float] = []  # the finite norms seen

    def threshold(self, g: float) -> float:
        if math.isfinite(g):
            self.norms.append(g)
        if len(self.norms) <= self.warmup:
            return self.warmup_max_norm
        window = self.norms[-self.window:]
        if not window:
            return INF
        return float(torch.quantile(torch.tensor(window, dtype=torch.float64), self.q))


class ZScoreRef(_NormPolicy):
    """ZClip: Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", 2025; mode "zscore" with "adaptive_scaling" (the paper's default).

    Warm-up: until ``warmup`` finite norms are collected (this step's counted),
    thr = max_norm (inf if None). At the warmup-th: mu = mean, var = population variance
    of the collected norms; that step keeps the warm-up threshold and no EMA update. Then

        z = (g - mu) / (sigma + eps),  sigma = sqrt(var)
        thr_a = mu + (z_thr * sigma) / (z / z_thr)   if z > z_thr   else inf
        thr = min(thr_a, max_norm)
        finite g:  x = thr_a if z > z_thr else g
                   mu  <- alpha * mu + (1 - alpha) * x
                   var <- alpha * var + (1 - alpha) * (x - mu)^2     (mu: the updated mean)
    """

    def __init__(self, z: float = 2.5, alpha: float = 0.97, warmup: int = 25, max_norm: float | None = None, eps: float = 1e-6):
        self.z, self.alpha, self.warmup, self.eps = z, alpha, warmup, eps
        self.cap = INF if max_norm is None else float(max_norm)
        self.collected: list[float] = []
        self.mu: float | None = None
        self.var = 0.0

    def threshold(self, g: float) -> float:
        finite = math.isfinite(g)
        if self.mu is None:  # warm-up
            if finite:
                self.collected.append(g)
                if len(self.collected) == self.warmup:
                    n = len(self.collected)
                    self.mu = sum(self.collected) / n
                    self.var = sum((x - self.mu) ** 2 for x in self.collected) / n
            return self.cap
        sigma = math.sqrt(self.var)
        z = (g - self.mu) / (sigma + self.eps)
        spike = z > self.z
        thr_a = self.mu + (self.z * sigma) / (z / self.z) if spike else INF
        if finite:
            x = thr_a if spike else g
            self.mu = self.alpha * self.mu + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mu) ** 2
        return min(thr_a, self.cap)


class AGCRef:
    """Unit-wise adaptive gradient clipping: Brock, De, Smith, Simonyan, "High-Performance
    Large-Scale Image Recognition Without Normalization" (NFNets), ICML 2021.

    For each parameter W with gradient G and each unit i (a row along dim 0 for ndim >= 2,
    normed over all other dims; the whole tensor for ndim <= 1), in float32:

        max_i = clipping * max(||W_i||_2, eps)
        G_i <- G_i                                  if ||G_i||_2 < max_i
        G_i <- G_i * (max_i / max(||G_i||_2, 1e-6))  otherwise   (factor cast to G's dtype)

    W is read before the optimizer updates it. The returned total norm is the pre-clip
    global L2 norm; the threshold is nan. ``clipped`` counts the units scaled in the last step,
    ``units`` the units there were.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3):
        self.clipping, self.eps = clipping, eps
        self.clipped = self.units = 0

    def clip_(self, params) -> tuple[torch.Tensor, float]:
        params = _with_grads(params)
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.clipped = self.units = 0
        with torch.no_grad():
            for p in params:
                dim = tuple(range(1, p.ndim)) if p.ndim >= 2 else None
                w_norm = torch.linalg.vector_norm(p.float(), dim=dim, keepdim=True).clamp(min=self.eps)
                g_norm = torch.linalg.vector_norm(p.grad.float(), dim=dim, keepdim=True)
                max_norm = self.clipping * w_norm
                clip = g_norm >= max_norm
                factor = torch.where(clip, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
                p.grad.mul_(factor.to(p.grad.dtype))
                self.clipped += int(clip.sum())
                self.units += clip.numel()
        return total, math.nan
