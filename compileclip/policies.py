"""Adaptive thresholds, given as ``max_norm``: small frozen config objects, validated at
construction. The arithmetic lives in ``compileclip.passes.thresholds`` (device tensors, no host
sync), so that the compiled step graphs and the eager clip run the very same function.

Every policy clips with eager's formula, ``clip_grad_norm_(params, thr)``:
``coef = clamp(thr / (total + 1e-6), max=1)``, with the policy's threshold ``thr`` for the
step (``inf``: no clipping). A nonfinite total norm never enters a policy's statistics.
Steps count from 1: the first optimizer step the clip clips.
"""

from __future__ import annotations

import dataclasses
import math
import numbers


def _number(owner: str, name: str, value: object, *, low: float, high: float = math.inf,
            low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}({name}=...) must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if math.isnan(v) or not lo_ok or not hi_ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{owner}({name}={value!r}) is not allowed: it must lie in {lo}{low}, {high}{hi}")
    return v


def _count(owner: str, name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{owner}({name}={value!r}) is not allowed: it must be an int >= {low}")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Percentile:
    """AutoClip (Seetharaman et al., 2020): clip at the ``q``-quantile of the gradient norms seen.

    Until ``warmup`` finite norms were seen (this step's included) it clips at
    ``warmup_max_norm`` (``None``: not at all). After that the threshold is the ``q``-quantile
    (``torch.quantile``'s linear interpolation) of the last ``window`` finite norms, this
    step's own included, as in the paper's ``eta_c(t) = percentile(G_h(t), p)`` with
    ``G_h(t) = {g_1, ..., g_t}``; ``window`` bounds the memory (a ring buffer of ``window``
    floats on the device). Nonfinite norms (a GradScaler overflow, a skipped step) are not
    counted at all: so a step the scaler skips without calling ``opt.step()``, which the clip
    never sees, changes nothing either.
    """

    q: float = 0.9
    window: int = 1000
    warmup: int = 25
    warmup_max_norm: float | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "q", _number(name, "q", self.q, low=0.0, high=1.0, low_open=True))
        object.__setattr__(self, "window", _count(name, "window", self.window, 1))
        object.__setattr__(self, "warmup", _count(name, "warmup", self.warmup, 0))
        object.__setattr__(self, "warmup_max_norm",
                           _number(name, "warmup_max_norm", self.warmup_max_norm, low=0.0, allow_none=True))

    kind = "percentile"

    @property
    def params(self) -> list[float]:
        mn = math.inf if self.warmup_max_norm is None else self.warmup_max_norm
        return [self.q, float(self.window), float(self.warmup), mn]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZScore:
    """ZClip (Kumar et al., 2025), its "zscore" mode with "adaptive_scaling" (the paper's default).

    Warm-up: until ``warmup`` finite norms were seen (this step's included), clip at
    ``max_norm`` (``None``: not at all); at that step, the mean ``mu`` and the (population)
    variance ``var`` of those norms start the statistics. After: ``z = (g - mu) / (sigma + eps)``;
    a spike, ``z > z_thr``, is clipped to ``mu + z_thr * sigma / (z / z_thr)`` (the larger
    the spike, the lower the threshold), other steps are not clipped; ``max_norm``, if given,
    caps the threshold. Then the EMA takes the clipped norm (``x``: the spike's threshold, or
    ``g``): ``mu <- alpha mu + (1 - alpha) x``, ``var <- alpha var + (1 - alpha) (x - mu)^2``
    (with the new ``mu``), so a spike moves the statistics only up to its threshold.
    """

    z: float = 2.5
    alpha: float = 0.97
    warmup: int = 25
    max_norm: float | None = None
    eps: float = 1e-6

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "z", _number(name, "z", self.z, low=0.0, low_open=True, high_open=True))
        object.__setattr__(self, "alpha", _number(name, "alpha", self.alpha, low=0.0, high=1.0, high_open=True))
        object.__setattr__(self, "warmup", _count(name, "warmup", self.warmup, 1))
        object.__setattr__(self, "max_norm", _number(name, "max_norm", self.max_norm, low=0.0, allow_none=True))
        object.__setattr__(self, "eps", _number(name, "eps", self.eps, low=0.0, high_open=True))

    kind = "zscore"

    @property
    def params(self) -> list[float]:
        mn = math.inf if self.max_norm is None else self.max_norm
        return [self.z, self.alpha, float(self.warmup), mn, self.eps]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AGC:
    """Adaptive gradient clipping (Brock et al., 2021, NFNets), unit-wise.

    Per parameter ``W`` with gradient ``G`` and per unit ``i`` (a slice along dim 0, the output
    unit, for ``ndim >= 2``; the whole tensor for ``ndim <= 1``):
    ``max_i = clipping * max(||W_i||, eps)``, and ``G_i <- G_i * max_i / max(||G_i||, 1e-6)``
    where ``||G_i|| >= max_i``. Norms in float32, from the parameters before the update. There
    is no global threshold: ``total_norm`` is still the pre-clip global norm, for monitoring.
    It applies to every parameter the optimizer steps (NFNets leaves the classifier out: give
    it its own optimizer without this clip for that).
    """

    clipping: float = 0.01
    eps: float = 1e-3

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "clipping", _number(name, "clipping", self.clipping, low=0.0, low_open=True, high_open=True))
        object.__setattr__(self, "eps", _number(name, "eps", self.eps, low=0.0, high_open=True))

    kind = "agc"


POLICIES = (Percentile, ZScore, AGC)
