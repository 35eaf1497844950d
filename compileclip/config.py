"""Configuration of a clip backend: one frozen dataclass, validated at construction."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

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


def _check_max_norm(max_norm: object) -> float | torch.Tensor:
    if isinstance(max_norm, torch.Tensor):
        if max_norm.dim() != 0 or not max_norm.is_floating_point():
            raise TypeError(
                "max_norm as a tensor must be a 0-d floating point tensor, got "
                f"shape {tuple(max_norm.shape)} dtype {max_norm.dtype}"
            )
        value = float(max_norm)  # one host sync, at construction only
    elif isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(
            "max_norm must be a float >= 0 or a 0-d floating point tensor, got "
            f"{type(max_norm).__name__} {max_norm!r}"
        )
    else:
        value = float(max_norm)
    if math.isnan(value) or value < 0:
        raise ValueError(f"max_norm={value!r} is not allowed: it must be a number >= 0")
    return max_norm if isinstance(max_norm, torch.Tensor) else value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipConfig:
    """What to clip and how, with the names of ``torch.nn.utils.clip_grad_norm_``.

    ``max_norm``: a float >= 0, or a 0-d floating point tensor whose value may be changed
    in place between steps (it is a graph input, so no recompile happens).
    ``norm_type``: a float p > 0, ``math.inf`` or ``'inf'``.
    ``error_if_nonfinite``: raise like eager when the total norm is nan/inf; this costs one
    host sync per backward, the default does not sync.
    ``inner``: the compiler the clipped graphs go to, ``'inductor'`` or ``'aot_eager'``
    (debugging: no Inductor, same graphs).
    ``fuse``: ``False`` always takes the unfused path (clip over the final ``.grad`` at the
    end of each backward), for debugging and comparison.
    ``step_writes_grad``: where the clip runs inside a compiled optimizer step
    (``torch.compile(opt.step, backend=clip)``), also store the clipped gradient into
    ``.grad``, as eager ``clip_grad_norm_`` leaves it. ``False`` skips that write (the update
    is the same) when nothing reads ``.grad`` after the step.
    """

    max_norm: float | torch.Tensor
    norm_type: float = 2.0
    error_if_nonfinite: bool = False
    inner: str = "inductor"
    fuse: bool = True
    step_writes_grad: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_norm", _check_max_norm(self.max_norm))
        object.__setattr__(self, "norm_type", _normalize_norm_type(self.norm_type))
        if not isinstance(self.error_if_nonfinite, bool):
            raise TypeError(
                "error_if_nonfinite must be a bool, got "
                f"{type(self.error_if_nonfinite).__name__} {self.error_if_nonfinite!r}"
            )
        if not isinstance(self.fuse, bool):
            raise TypeError(f"fuse must be a bool, got {type(self.fuse).__name__} {self.fuse!r}")
        if not isinstance(self.step_writes_grad, bool):
            raise TypeError(
                "step_writes_grad must be a bool, got "
                f"{type(self.step_writes_grad).__name__} {self.step_writes_grad!r}"
            )
        if self.inner not in _INNER:
            raise ValueError(f"inner={self.inner!r} is not supported: choose one of {_INNER}")
