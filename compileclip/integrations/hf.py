"""transformers' ``Trainer`` with a model compiled by a compileclip clip.

    clip = clip_backend(max_norm=1.0)
    model = torch.compile(model, backend=clip)          # before the Trainer gets it
    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=0), ...)
    use_clip(trainer, clip)
    trainer.train()

``use_clip`` (or the callback alone, ``callbacks=[ClipCallback(clip)]``):

- refuses a ``max_grad_norm`` that would clip a second time with another value, and turns off
  one equal to the clip's ``max_norm`` (the Trainer's default is 1.0), with a warning;
- logs the clip's ``total_norm`` as the Trainer's ``grad_norm`` (the same value: the pre-clip
  norm of the gradients the optimizer consumes).

With clipping off, the Trainer still computes a norm for its log every step, through
``accelerator.clip_grad_norm_(params, inf)``: a read of every gradient for the norm, then a
multiplication of every gradient by 1.0 (a read and a write), which also moves the gradients'
version counters, so the clip cannot use its backward's norms and norms at the step again.
transformers has no supported hook to turn that off. ``use_clip`` replaces the Trainer's private
``_get_grad_norm`` on that one Trainer object (where it exists, checked) by the clip's norm;
the callback alone cannot, and says so once.
"""

from __future__ import annotations

import warnings

import torch
from transformers import TrainerCallback

from . import reconcile


def _check(args, clip) -> None:
    if reconcile(args.max_grad_norm, clip, where="TrainingArguments.max_grad_norm", off="max_grad_norm=0"):
        args.max_grad_norm = 0.0


class ClipCallback(TrainerCallback):
    """Checks ``max_grad_norm`` when training begins and logs the clip's norm as ``grad_norm``."""

    def __init__(self, clip) -> None:
        self.clip = clip
        self.norm: torch.Tensor | None = None  # the last step's norm, on the device (use_clip)
        self.patched = False

    def on_train_begin(self, args, state, control, **kwargs):
        _check(args, self.clip)
        if not self.patched:
            warnings.warn(
                "compileclip: the Trainer computes a gradient norm of its own every step for its "
                "grad_norm log (a read and a write of every gradient); compileclip.integrations.hf."
                "use_clip(trainer, clip) replaces it by the clip's norm", stacklevel=2)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.norm is not None and self.clip._runtime.total_norm is not None:
            self.norm.copy_(self.clip._runtime.total_norm.detach())  # on the device: no sync

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "grad_norm" in logs and self.clip._runtime.total_norm is not None:
            logs["grad_norm"] = float(self.clip._runtime.total_norm)

    def grad_norm(self, model, grad_norm=None):
        """The Trainer's ``_get_grad_norm``: a device scalar that holds the clip's norm once the
        step has run (the Trainer reads it, with ``.item()``, only when it logs)."""
        if self.norm is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            self.norm = torch.full((), float("nan"), dtype=torch.float32, device=device)
        return self.norm


def use_clip(trainer, clip) -> ClipCallback:
    """Wire ``clip`` (whose model the Trainer trains) into ``trainer``; returns the callback."""
    _check(trainer.args, clip)
    callback = ClipCallback(clip)
    if callable(getattr(trainer, "_get_grad_norm", None)):
        trainer._get_grad_norm = callback.grad_norm
        callback.patched = True
    trainer.add_callback(callback)
    return callback
