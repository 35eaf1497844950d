"""Lightning with the clip (``compileclip.integrations.lightning.ClipCallback``) against the
same Trainer clipping eagerly itself (``gradient_clip_val`` / ``self.clip_gradients``), on the
same data: automatic optimization (Lightning's closure step) with ``accumulate_grad_batches=2``,
and manual optimization. Both networks are compiled with ``aot_eager`` (eager's kernels), so
the parameters, the gradients each step consumed and the logged norm are compared bit for bit.
Clip active and inactive.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402

from compileclip import clip_backend  # noqa: E402
from compileclip.integrations.lightning import ClipCallback  # noqa: E402

ACTIVE, INACTIVE = 0.05, 1e6
BATCHES = 8


class Capture(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))


class Module(L.LightningModule):
    def __init__(self, backend, manual: bool = False, clip_val: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        self.run = self.net if backend is None else torch.compile(self.net, backend=backend)
        self.automatic_optimization = not manual
        self.clip_val = clip_val  # manual optimization's own clip (the reference)
        self.pre_clip: list[torch.Tensor] = []  # the reference's norms
        self.consumed: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.run(x) - y).pow(2).mean()
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.clip_val is not None:
            self.pre_clip.append(torch.nn.utils.get_total_norm([p.grad for p in self.net.parameters()]))
            self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        opt.step()
        self.consumed.append({n: p.grad.clone() for n, p in self.net.named_parameters()})
        return loss

    def on_before_optimizer_step(self, optimizer):  # automatic: before Lightning's own clip
        if self.automatic_optimization:
            self.pre_clip.append(torch.nn.utils.get_total_norm([p.grad for p in self.net.parameters()]))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.automatic_optimization and (batch_idx + 1) % 2 == 0:  # after a step, before zero_grad
            self.consumed.append({n: p.grad.clone() for n, p in self.net.named_parameters()})

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=1e-2)


def data():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(BATCHES * 4, 8, generator=g), torch.randn(BATCHES * 4, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def fit(manual: bool, max_norm: float, clip=None, gradient_clip_val=None):
    module = Module(clip if clip is not None else "aot_eager", manual,
                    clip_val=max_norm if (clip is None and manual) else None)
    logger = Capture()
    callbacks = [ClipCallback(clip)] if clip is not None else []
    if clip is None and not manual:
        gradient_clip_val = max_norm
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accumulate_grad_batches=1 if manual else 2,
                        gradient_clip_val=gradient_clip_val)
    trainer.fit(module, data())
    return module, [r["grad_norm"] for r in logger.rows if "grad_norm" in r]


def assert_same(ours, logged, ref, steps: int, max_norm: float) -> None:
    """Bit for bit: the gradients each step consumed, the final parameters, the logged norms."""
    assert len(ref.consumed) == len(ours.consumed) == len(ref.pre_clip) == steps
    for k, (g, r) in enumerate(zip(ours.consumed, ref.consumed)):
        for n in r:
            torch.testing.assert_close(g[n], r[n], rtol=0, atol=0, msg=f"step {k}: consumed .grad of {n}")
    for (n, p), q in zip(ours.net.named_parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"parameter {n}")
    assert [float(v) for v in logged] == [float(v) for v in ref.pre_clip]
    assert all((float(n) > max_norm) == (max_norm == ACTIVE) for n in ref.pre_clip)  # active / inactive


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE])
@pytest.mark.parametrize("manual", [False, True], ids=["automatic_accumulate2", "manual"])
def test_lightning_matches_its_own_clip(manual, max_norm):
    ref, _ = fit(manual, max_norm)
    clip = clip_backend(max_norm=max_norm, inner="aot_eager")
    ours, logged = fit(manual, max_norm, clip)
    assert_same(ours, logged, ref, BATCHES if manual else BATCHES // 2, max_norm)


def test_compiled_lightning_module():
    """``torch.compile(module, backend=clip)`` handed to ``trainer.fit`` (Lightning compiles
    ``training_step`` and ``forward`` with the same backend), against the same module compiled
    with ``aot_eager`` and ``gradient_clip_val``; automatic optimization, accumulation 2."""
    results = []
    for clip in (None, clip_backend(max_norm=ACTIVE, inner="aot_eager")):
        module = Module(None)
        logger = Capture()
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger,
                            callbacks=[ClipCallback(clip)] if clip is not None else [], log_every_n_steps=1,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            accumulate_grad_batches=2, gradient_clip_val=None if clip is not None else ACTIVE)
        trainer.fit(torch.compile(module, backend=clip if clip is not None else "aot_eager"), data())
        results.append((module, [r["grad_norm"] for r in logger.rows if "grad_norm" in r]))
    (ref, _), (ours, logged) = results
    assert_same(ours, logged, ref, BATCHES // 2, ACTIVE)


def test_gradient_clip_val_twice_is_refused_or_turned_off():
    clip = clip_backend(max_norm=ACTIVE, inner="aot_eager")
    with pytest.raises(ValueError, match=r"gradient_clip_val=0\.5 would clip the gradients a second time"):
        fit(False, ACTIVE, clip, gradient_clip_val=0.5)
    ref, _ = fit(False, ACTIVE)
    clip = clip_backend(max_norm=ACTIVE, inner="aot_eager")
    with pytest.warns(UserWarning, match="turned off Trainer.gradient_clip_val=0.05"):
        ours, _ = fit(False, ACTIVE, clip, gradient_clip_val=ACTIVE)
    for (n, p), q in zip(ours.net.named_parameters(), ref.net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"parameter {n}")
