"""GradScaler with the clip, against eager over several steps (``train`` of ``test_policies.py``,
on ``harness.py``): overflows that skip the step and back the scale off, accumulation, value
clipping, ``fuse=False``, a user who unscales first, a disabled scaler, autocast; and the
errors (a second step before ``update``, fp16 gradients, a scaler of the wrong type).

The eager reference: ``scaler.scale(loss).backward(); scaler.unscale_(opt);
clip_grad_norm_(params, max_norm); scaler.step(opt); scaler.update()``. After every step:
parameters, optimizer state, ``.grad``, the total norm and the scale.
"""

from __future__ import annotations

import pytest
import torch

import models
from compileclip import clip_backend
from harness import ACTIVE, INACTIVE, in_fresh_process, isolated, new_clip  # noqa: F401
from test_policies import MODES, OPTIMIZERS, train


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler(mode, max_norm):
    """Scaled gradients that overflow (steps 1 and 3): the step is skipped and the scale
    backs off, as with eager unscale_/clip/scaler.step/update; the scale grows otherwise."""
    clip = train(mode=mode, max_norm=max_norm, amp=True, bad_steps={1: "inf", 3: "nan"}, steps=5)
    # the compiled step skipped; in backward mode scaler.step did, and the clip never heard those steps
    assert int(clip.skipped_steps) == (0 if mode == "backward" else 2)
    expected = {  # every norm from the backward; both: the first step before the step graph exists
        "backward": {"backward_graph_runs": 5, "step_eager": 3, "norm_from_backward": 3},
        "both": {"backward_graph_runs": 5, "step_eager": 1, "step_in_graph": 4, "norm_from_backward": 5},
    }
    if mode in expected:
        assert clip.stats == expected[mode], clip.stats
    else:  # the model runs eagerly
        assert "backward_graph_runs" not in clip.stats and "step_eager" not in clip.stats, clip.stats


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_value_clipping_keeps_overflow_visible(mode):
    """clip_value alone with a GradScaler: eager finds the inf in unscale_, before
    clip_grad_value_ would clamp it to a finite value. In the backward, the clamp leaves
    inf elements alone so that scaler.step still finds them; so .grad on a skipped step
    holds inf where eager's holds +-clip_value (backward mode only, where the clip never hears
    that step anyway). Adam's state from step 1: see test_skipped_first_adam_step_keeps_only_initial_state."""
    train(mode=mode, clip_value=1e-3, amp=True, bad_steps={0: "inf", 2: "inf"}, steps=4,
          grads_on_skipped_steps=mode != "backward", state_from_step=1)


@pytest.mark.parametrize("mode", ["step", "both"])
def test_grad_scaler_gradient_accumulation(mode):
    """Three scaled micro-batches per step, an overflow in the last one of step 1."""
    clip = train(mode=mode, max_norm=ACTIVE, amp=True, micro_batches=3, bad_steps={1: "inf"}, steps=3)
    assert int(clip.skipped_steps) == 1
    assert clip.stats.get("norm_from_backward", 0) == 0, clip.stats  # accumulated: the step's own norm
    if mode == "both":  # 3 backward graph runs per step; the first step before the step graph exists
        expected = {"backward_graph_runs": 9, "step_eager": 1, "norm_at_step": 1, "step_in_graph": 2}
        assert clip.stats == expected, clip.stats


@pytest.mark.parametrize("mode", ["backward", "step"])
def test_grad_scaler_with_value_clipping(mode):
    train(mode=mode, max_norm=ACTIVE, clip_value=1e-3, amp=True, bad_steps={1: "inf"}, steps=3,
          expect_value_active=True)


def test_grad_scaler_fuse_false_step():
    """fuse=False clips every step eagerly in the step's pre-hook; with a scaler attached and
    not yet unscaled it stands in for scaler.step(opt): unscale_, clip, skip on overflow."""
    clip = train(mode="step", max_norm=ACTIVE, amp=True, bad_steps={1: "inf"}, steps=3, backend_kwargs={"fuse": False})
    assert int(clip.skipped_steps) == 1
    assert clip.stats == {"step_eager": 3, "norm_at_step": 3}, clip.stats


@pytest.mark.parametrize("how", ["unscale_", "scaler.step"])
def test_grad_scaler_already_unscaled(how):
    """The user unscales (``scaler.unscale_(opt)``, or ``scaler.step(opt)`` with ``opt.step``
    replaced by the compiled step): the step must not unscale again."""
    clip = train(mode="replaced", how=how, max_norm=ACTIVE, amp=True, optimizer="sgd", foreach=False,
                 bad_steps={1: "inf"}, steps=3, scaler_kwargs={"init_scale": 256.0})
    # scaler.step(opt) does not call opt.step() on an overflow; after unscale_ the step skips
    assert int(clip.skipped_steps) == (1 if how == "unscale_" else 0)


def test_step_twice_without_update_raises():
    model = models.mlp()
    opt = OPTIMIZERS["sgd"](model.parameters(), False)
    scaler = torch.amp.GradScaler("cpu")
    step = torch.compile(opt.step, backend=new_clip(max_norm=1.0, scaler=scaler))
    scaler.scale(model(torch.randn(2, 8)).pow(2).mean()).backward()
    step()
    with pytest.raises(RuntimeError, match="already stepped since the last scaler.update"):
        step()


def refuses_fp16():
    model = models.mlp().half()
    opt = OPTIMIZERS["sgd"](model.parameters(), False)
    scaler = torch.amp.GradScaler("cpu")
    step = torch.compile(opt.step, backend=clip_backend(max_norm=1.0, scaler=scaler))
    scaler.scale(model(torch.randn(2, 8).half()).pow(2).mean().float()).backward()
    try:
        step()
    except torch._dynamo.exc.BackendCompilerFailed as e:
        return str(e)
    return None


def test_grad_scaler_refuses_fp16_gradients_like_unscale_():
    # in a fresh process: Dynamo keeps a backend that raised alive, even after torch._dynamo.reset().
    # The error comes back as text: a pytest.raises failing in the pool's process would hang it
    error = in_fresh_process(refuses_fp16)
    assert error is not None and "refuses to unscale FP16 gradients" in error, error


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_disabled_scaler_is_ignored(max_norm):
    """GradScaler(enabled=False) scales nothing; the clip must not unscale either."""
    train(mode="step", max_norm=max_norm, amp=True, scaler_kwargs={"enabled": False}, optimizer="sgd", foreach=False,
          steps=3)


def test_scaler_type_is_checked():
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        new_clip(max_norm=1.0, scaler=object())


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_autocast_bf16_with_scaler(max_norm):
    """torch.autocast (bf16 on CPU) around the forward, fp32 parameters and gradients; model
    and step compiled with the clip. The reference compiles them too, with plain
    ``torch.compile``: the compiled bf16 forward/backward rounds differently from eager's (5e-4
    relative on the norm), and with it that rounding cancels and only the clip is compared."""
    # SGD: its update is linear in the gradient, so bf16 rounding differences stay that
    # size (Adam's normalisation turns them into lr-sized steps on near-zero elements)
    train(mode="both", max_norm=max_norm, amp=True, autocast=True, optimizer="sgd", steps=3,
          scaler_kwargs={"init_scale": 1024.0}, compiled_reference=True)
