"""transformers' Trainer with a model compiled by the clip (``compileclip.integrations.hf``),
against the same Trainer clipping eagerly itself (``max_grad_norm``), on the same data.

Both models are compiled with ``aot_eager`` (the clip's ``inner`` and a plain ``torch.compile``
control), so both run eager's kernels: with ``adamw_torch`` (foreach) the parameters, the
gradients the optimizer consumed and the logged ``grad_norm`` must be equal bit for bit. With
``adamw_torch_fused`` the clip divides by ``1 / coef`` inside the fused kernel where eager
multiplies by ``coef`` first (an ulp or so per element), so those compare within float32's
tolerance. Tiny GPT-2 from a config; nothing is downloaded. Clip active and inactive.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from compileclip import clip_backend  # noqa: E402
from compileclip.integrations.hf import ClipCallback, use_clip  # noqa: E402

ACTIVE, INACTIVE = 0.05, 1e6
STEPS, BATCH = 3, 4


@pytest.fixture
def hf_norm_calls(monkeypatch):
    """How often the Trainer clipped or normed the gradients itself (accelerate's clip_grad_norm_)."""
    from accelerate import Accelerator

    calls = []
    orig = Accelerator.clip_grad_norm_

    def counting(self, *args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("max_norm"))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", counting)
    return calls


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = STEPS * BATCH * 2) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class Consumed(TrainerCallback):
    """The gradients each optimizer step consumed (after the step, before zero_grad)."""

    def __init__(self, model) -> None:
        self.model, self.grads = model, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


def train(tmp_path, optim: str, max_grad_norm: float, clip=None, how: str = "use_clip", accumulate: int = 2):
    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulate,
        learning_rate=1e-2, optim=optim, max_grad_norm=max_grad_norm, logging_steps=1, report_to=[], use_cpu=True,
        seed=0, data_seed=0, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant")
    # in place (nn.Module.compile): the Trainer reads forward's signature to pick dataset columns
    model.compile(backend=clip if clip is not None else "aot_eager")
    consumed = Consumed(model)
    callbacks = [consumed] + ([ClipCallback(clip)] if how == "callback" else [])
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    if clip is not None and how == "use_clip":
        use_clip(trainer, clip)
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return dict(params={n: p.detach().clone() for n, p in model.named_parameters()}, grads=consumed.grads,
                norms=norms)


def assert_same(ours, ref, bitwise: bool, max_norm: float) -> None:
    check = (lambda a, b, m: torch.testing.assert_close(a, b, rtol=0, atol=0, msg=m)) if bitwise else (
        lambda a, b, m: torch.testing.assert_close(a, b, msg=m))
    assert len(ours["grads"]) == len(ref["grads"]) == STEPS
    for step, (g, r) in enumerate(zip(ours["grads"], ref["grads"])):
        assert g.keys() == r.keys()
        for n in r:
            check(g[n], r[n], f"step {step}: consumed .grad of {n}")
    for n in ref["params"]:
        check(ours["params"][n], ref["params"][n], f"parameter {n}")
    assert len(ours["norms"]) == len(ref["norms"]) == STEPS
    if bitwise:
        assert ours["norms"] == ref["norms"], (ours["norms"], ref["norms"])
    else:
        assert ours["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    assert all((n > max_norm) == (max_norm == ACTIVE) for n in ref["norms"]), ref["norms"]  # active / inactive


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE])
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_trainer_matches_its_own_clip(tmp_path, optim, max_norm, hf_norm_calls):
    ref = train(tmp_path, optim, max_grad_norm=max_norm)
    assert hf_norm_calls == [max_norm] * STEPS
    hf_norm_calls.clear()
    clip = clip_backend(max_norm=max_norm, inner="aot_eager")
    ours = train(tmp_path, optim, max_grad_norm=0.0, clip=clip)
    assert_same(ours, ref, bitwise=optim == "adamw_torch", max_norm=max_norm)
    assert hf_norm_calls == []  # the Trainer normed nothing itself (it would, for its log)
    if optim == "adamw_torch_fused":
        assert clip.stats.get("scale_folded") == STEPS, clip.stats


def test_fused_without_accumulation_reads_the_gradients_once(tmp_path, hf_norm_calls):
    """The norms come from the backward graph and the scale goes into the fused kernel: the
    clip adds no pass over the gradients of its own."""
    ref = train(tmp_path, "adamw_torch_fused", max_grad_norm=ACTIVE, accumulate=1)
    hf_norm_calls.clear()
    clip = clip_backend(max_norm=ACTIVE, inner="aot_eager")
    ours = train(tmp_path, "adamw_torch_fused", max_grad_norm=0.0, clip=clip, accumulate=1)
    assert_same(ours, ref, bitwise=False, max_norm=ACTIVE)
    assert hf_norm_calls == []
    stats = clip.stats
    assert stats.get("norm_from_backward") == STEPS and stats.get("scale_folded") == STEPS, stats
    assert not stats.get("norm_at_step"), stats


def test_equal_max_grad_norm_is_turned_off_with_a_warning(tmp_path):
    ref = train(tmp_path, "adamw_torch", max_grad_norm=ACTIVE)
    clip = clip_backend(max_norm=ACTIVE, inner="aot_eager")
    with pytest.warns(UserWarning, match="turned off TrainingArguments.max_grad_norm=0.05"):
        ours = train(tmp_path, "adamw_torch", max_grad_norm=ACTIVE, clip=clip)
    assert_same(ours, ref, bitwise=True, max_norm=ACTIVE)


def test_a_different_max_grad_norm_is_refused(tmp_path):
    clip = clip_backend(max_norm=ACTIVE, inner="aot_eager")
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0 would clip the gradients a second time.*max_norm=0\.05"):
        train(tmp_path, "adamw_torch", max_grad_norm=1.0, clip=clip)


def test_callback_alone_is_exact_and_says_what_it_costs(tmp_path):
    """Passed through ``callbacks=``, the callback cannot stop the Trainer's own norm (a
    ``clip_grad_norm_(params, inf)``, which multiplies every gradient by 1.0): still exact."""
    ref = train(tmp_path, "adamw_torch", max_grad_norm=ACTIVE)
    clip = clip_backend(max_norm=ACTIVE, inner="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = train(tmp_path, "adamw_torch", max_grad_norm=0.0, clip=clip, how="callback")
    assert any("use_clip(trainer, clip) replaces it" in str(w.message) for w in caught)
    assert_same(ours, ref, bitwise=True, max_norm=ACTIVE)
