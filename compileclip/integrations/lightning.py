"""Lightning with a LightningModule compiled by a compileclip clip.

    clip = clip_backend(max_norm=1.0)
    model = torch.compile(MyModule(), backend=clip)        # or compile its layers
    trainer = L.Trainer(callbacks=[ClipCallback(clip)])   # no gradient_clip_val
    trainer.fit(model, ...)

``ClipCallback`` refuses a ``gradient_clip_val`` that would clip a second time with another
value (and turns off one equal to the clip's ``max_norm``, with a warning), and logs the clip's
``total_norm`` with ``self.log`` after each optimizer step (a device tensor: Lightning reads
it when it logs). Works with automatic optimization (Lightning's closure step: the clip runs
inside ``optimizer.step`` after the closure's backward), ``accumulate_grad_batches`` and manual
optimization (where Lightning's own ``self.clip_gradients`` is simply not called).
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback

from . import reconcile


class ClipCallback(Callback):
    def __init__(self, clip, name: str = "grad_norm", **log_kwargs) -> None:
        super().__init__()
        self.clip = clip
        self.name = name
        self.log_kwargs = {"on_step": True, "on_epoch": False, "prog_bar": False, **log_kwargs}
        self._steps = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
        if trainer.gradient_clip_val and algorithm.endswith("value"):
            raise ValueError(
                f"compileclip: Trainer(gradient_clip_val={trainer.gradient_clip_val!r}, "
                "gradient_clip_algorithm='value') would clamp the gradients before the compileclip "
                "clip: use clip_backend(clip_value=...) and no gradient_clip_val")
        if reconcile(trainer.gradient_clip_val, self.clip, where="Trainer.gradient_clip_val", off="gradient_clip_val=None"):
            trainer.gradient_clip_val = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        total = self.clip._runtime.total_norm
        if total is None or trainer.global_step == self._steps:  # no optimizer step in this batch
            return
        self._steps = trainer.global_step
        pl_module.log(self.name, total, **self.log_kwargs)
