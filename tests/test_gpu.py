"""The policies suite on a CUDA device (skipped without one): the same golden comparisons
against eager as ``test_policies.py``, with Triton kernels instead of C++ ones. Run these
whenever a GPU is lent (``pytest tests/test_gpu.py``)."""

from __future__ import annotations

import pytest
import torch

from harness import ACTIVE, INACTIVE
from test_policies import MODES, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("mode", MODES)
def test_norm_clip_cuda(mode, max_norm):
    train(mode=mode, max_norm=max_norm, steps=3, device="cuda")


@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_cuda(mode):
    clip = train(mode=mode, max_norm=ACTIVE, amp=True, bad_steps={1: "inf", 3: "nan"}, steps=5, device="cuda")
    if mode != "backward":
        assert int(clip.skipped_steps) == 2
        assert clip.skipped_steps.device.type == "cuda"


@pytest.mark.parametrize("mode", ["step", "both"])
def test_skip_nonfinite_cuda(mode):
    clip = train(mode=mode, max_norm=ACTIVE, skip_nonfinite=True, bad_steps={1: "nan"}, steps=3, device="cuda")
    assert int(clip.skipped_steps) == 1


@pytest.mark.parametrize("mode", MODES)
def test_clip_value_cuda(mode):
    train(mode=mode, max_norm=ACTIVE, clip_value=1e-3, steps=3, device="cuda")
