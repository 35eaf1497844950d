"""Configuration of a clip backend: one frozen dataclass, validated at construction."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .policies import POLICIES

_INNER = ("inductor", "aot_eager")


def _normalize_norm_type(norm_type: object) -> float:
    if isinstance(norm_type, str):
        if norm_type.lower() == "inf":
            return math.inf
        raise ValueError(
            f"norm_type={norm_type!r} is not supported: pass a float p > 0, "
            "math.inf or 'inf'"
        )
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise TypeError(
            f"norm_type must be a float p > 0, math.inf or 'inf', "
            f"got {type(norm_type).__name__} {norm_type!r}"
        )
    p = float(norm_type)
    if math.isnan(p) or p <= 0:
        raise ValueError(
            f"norm_type={norm_type!r} is not supported: pass a float p > 0, "
            "math.inf or 'inf'"
        )
    return p


def _check_max_norm(max_norm: object):
    if max_norm is None or isinstance(max_norm, POLICIES):
        return max_norm
    if isinstance(max_norm, type) and issubclass(max_norm, POLICIES):
        raise TypeError(
            f"max_norm={max_norm.__name__} is the policy's class: pass an instance, "
            f"e.g. max_norm={max_norm.__name__}()"
        )
    if isinstance(max_norm, torch.Tensor):
        if max_norm.dim() != 0 or not max_norm.is_floating_point():
            raise TypeError(
                "max_norm as a tensor must be a 0-d floating point tensor, got "
                f"shape {tuple(max_norm.shape)} dtype {max_norm.dtype}"
            )
        value = float(max_norm)  # one host sync, at construction only
    elif isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(
            "max_norm must be a float >= 0, a 0-d floating point tensor or a policy "
            "(compileclip.Percentile, ZScore, AGC), got "
            f"{type(max_norm).__name__} {max_norm!r}"
        )
    else:
        value = float(max_norm)
    if math.isnan(value) or value < 0:
        raise ValueError(f"max_norm={value!r} is not allowed: it must be a number >= 0")
    return max_norm if isinstance(max_norm, torch.Tensor) else value


def _check_clip_value(clip_value: object) -> float | None:
    if clip_value is None:
        return None
    if isinstance(clip_value, bool) or not isinstance(clip_value, numbers.Real):
        raise TypeError(
            "clip_value must be a float > 0 or None, got "
            f"{type(clip_value).__name__} {clip_value!r}"
        )
    value = float(clip_value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"clip_value={value!r} is not allowed: it must be a finite number > 0")
    return value


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipConfig:
    """What to clip and how, with the names of ``torch.nn.utils.clip_grad_norm_``.

    ``max_norm``: a float >= 0, or a 0-d floating point tensor whose value may be changed
    in place between steps (it is a graph input, so no recompile happens); ``None`` for no
    norm clipping (then ``clip_value`` must be given).
    ``norm_type``: a float p > 0, ``math.inf`` or ``'inf'``.
    ``error_if_nonfinite``: raise like eager, at the step, when the total norm is nan/inf;
    this costs one host sync per step, the default does not sync.
    ``inner``: the compiler the clipped graphs go to, ``'inductor'`` or ``'aot_eager'``
    (debugging: no Inductor, same graphs).
    ``fuse``: ``False`` never uses the backward graphs' norm and compiles steps without the
    clip: every step clips eagerly, for debugging and comparison.
    ``clip_value``: also clip every gradient element to ``[-clip_value, clip_value]`` like
    ``clip_grad_value_``. With ``max_norm`` too, the norm clip applies first and the value
    clip to its result: eager ``clip_grad_norm_(ps, max_norm); clip_grad_value_(ps, v)``, so
    ``total_norm`` is always the norm of the gradients as the backward produced them.
    ``skip_nonfinite``: leave the parameters and the optimizer state untouched for a step
    whose total norm is nan/inf, and count such steps in ``skipped_steps``: decided on the
    device in a compiled step, with one host sync in an eager one.
    ``history``: keep the pre-clip total norm and the threshold of the last ``history`` steps
    in ring buffers on the device (``ClipBackend.history``, ``suggest_max_norm``, ``plot``).
    ``per_param_norms``: keep the pre-clip norm of each gradient of the last step, from the
    norm computation the clip does anyway (``ClipBackend.named_norms``).
    ``max_norm`` may also be an adaptive policy (``compileclip.policies``): ``Percentile``
    (AutoClip), ``ZScore`` (ZClip) or ``AGC`` (unit-wise, NFNets).
    ``step_writes_grad``: where the clip runs inside a compiled optimizer step
    (``torch.compile(opt.step, backend=clip)``), also store the clipped gradient into
    ``.grad``, as eager ``clip_grad_norm_`` leaves it. ``False`` skips that write (the update
    is the same) when nothing reads ``.grad`` after the step.
    """

    max_norm: float | torch.Tensor | None
    norm_type: float = 2.0
    error_if_nonfinite: bool = False
    clip_value: float | None = None
    skip_nonfinite: bool = False
    inner: str = "inductor"
    fuse: bool = True
    step_writes_grad: bool = True
    history: int | None = None
    per_param_norms: bool = False

    def __post_init__(self) -> None:
        if self.history is not None and (
            isinstance(self.history, bool) or not isinstance(self.history, numbers.Integral) or self.history < 1
        ):
            raise ValueError(f"history={self.history!r} is not allowed: give an int >= 1 (steps kept) or None")
        _check_bool("per_param_norms", self.per_param_norms)
        object.__setattr__(self, "max_norm", _check_max_norm(self.max_norm))
        object.__setattr__(self, "norm_type", _normalize_norm_type(self.norm_type))
        object.__setattr__(self, "clip_value", _check_clip_value(self.clip_value))
        for name in ("error_if_nonfinite", "skip_nonfinite", "fuse", "step_writes_grad"):
            _check_bool(name, getattr(self, name))
        if self.max_norm is None and self.clip_value is None:
            raise ValueError(
                "max_norm=None and clip_value=None: give max_norm (clip by the total norm), "
                "clip_value (clip each element) or both"
            )
        if self.error_if_nonfinite and self.skip_nonfinite:
            raise ValueError(
                "error_if_nonfinite=True and skip_nonfinite=True are two policies for the same "
                "event: choose one (raise with a host sync, or skip the step on the device)"
            )
        if self.error_if_nonfinite and self.max_norm is None:
            raise ValueError(
                "error_if_nonfinite=True needs max_norm: it checks the total norm, which "
                "value clipping alone (clip_value) does not compute"
            )
        if self.skip_nonfinite and not self.fuse:
            raise ValueError(
                "skip_nonfinite=True needs fuse=True: a step compiled with fuse=False holds no "
                "clip, so it would still apply a nonfinite step's update"
            )
        if self.inner not in _INNER:
            raise ValueError(f"inner={self.inner!r} is not supported: choose one of {_INNER}")

    @property
    def computes_norm(self) -> bool:
        """Whether the clip computes a total norm: for norm clipping, and for the nonfinite
        skip (which decides on the norm). Value clipping alone does not need one."""
        return self.max_norm is not None or self.skip_nonfinite
