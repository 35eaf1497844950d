"""Norm monitoring (issue 10): ``history=N`` and ``per_param_norms=True``, against the eager
references of ``reference_clip.py`` over the training loop of test_adaptive.py (24 steps,
norm spikes at steps 13 and 19; parameters, ``.grad``, optimizer state, total norm and
threshold compared after every step, on ``harness.py``), with the clip in the model, the
step or both.

- ``clip.history`` / ``clip.thresholds``: the pre-clip norms and thresholds of the last
  ``min(steps, N)`` steps, oldest first, checked after every step (so also after the ring
  buffer wrapped); ``clip.suggest_max_norm(q)`` is ``torch.quantile`` of those norms.
- ``clip.named_norms(model)`` / ``clip.param_norms``: each gradient's norm before the clip.
"""

from __future__ import annotations

import pytest
import torch

import models
from compileclip import AGC, Percentile, ZScore
from harness import isolated  # noqa: F401
from reference_clip import AGCRef, FixedRef, PercentileRef, ZScoreRef
from test_adaptive import run_against_reference
from test_policies import MODES

POLICIES = {  # name -> (policy, reference)
    "fixed": lambda: (0.5, FixedRef(0.5)),
    "percentile": lambda: (Percentile(q=0.9, window=8, warmup=5), PercentileRef(q=0.9, window=8, warmup=5)),
    "zscore": lambda: (ZScore(warmup=6, max_norm=0.6), ZScoreRef(warmup=6, max_norm=0.6)),
    "agc": lambda: (AGC(clipping=0.1), AGCRef(clipping=0.1)),
}


def check_history(n: int):
    """An ``after_step`` that compares the ring buffers with the reference's last n steps."""

    def check(i, clip, log, model):
        last = log[-n:]
        what = f"step {i + 1}"
        history, thresholds = clip.history, clip.thresholds
        assert history.dtype == thresholds.dtype == torch.float32, (history.dtype, thresholds.dtype)
        assert history.shape == thresholds.shape == (min(i + 1, n),), (what, history.shape, thresholds.shape)
        torch.testing.assert_close(history, torch.stack([e["norm"] for e in last]), msg=lambda m: f"{what} history: {m}")
        torch.testing.assert_close(
            thresholds, torch.tensor([e["thr"] for e in last], dtype=torch.float32), equal_nan=True,
            msg=lambda m: f"{what} thresholds: {m}",
        )

    return check


@pytest.mark.parametrize(
    "mode, policy",
    [(mode, "percentile") for mode in MODES] + [("step", "fixed"), ("both", "agc")],
)
def test_history(mode, policy):
    """N=10 over 24 steps: both spikes stay in the buffer until they fall out of it.
    Thresholds: the policy's (inf: no clip), max_norm itself for a fixed one, nan for AGC."""
    n = 10
    policy, ref = POLICIES[policy]()
    clip, log = run_against_reference(
        policy, ref, mode=mode, optimizer="adam", backend_kwargs={"history": n}, after_step=check_history(n),
    )
    norms = torch.stack([e["norm"] for e in log[-n:]])
    assert norms.isfinite().all()
    for q in (0.25, 0.5, 0.95, 1.0):
        got = torch.tensor(clip.suggest_max_norm(q=q), dtype=torch.float32)
        torch.testing.assert_close(got, torch.quantile(norms, q), msg=lambda m: f"suggest_max_norm(q={q}): {m}")
    # the default q is 0.95
    torch.testing.assert_close(torch.tensor(clip.suggest_max_norm(), dtype=torch.float32), torch.quantile(norms, 0.95))


def test_history_before_the_spike_leaves():
    """N=3 over 14 steps: the spike at step 13 is the middle entry of the last three."""
    policy, ref = POLICIES["zscore"]()
    clip, log = run_against_reference(
        policy, ref, mode="step", optimizer="sgd", steps=14, backend_kwargs={"history": 3}, after_step=check_history(3),
    )
    assert int(torch.argmax(clip.history)) == 1


@pytest.mark.parametrize("mode, policy", [("backward", "fixed"), ("step", "zscore"), ("both", "agc")])
def test_per_param_norms(mode, policy):
    """After every step, each gradient's pre-clip norm by name and as one vector (its order
    is not specified: compared sorted)."""
    names = [n for n, _ in models.mlp().named_parameters()]

    def check(i, clip, log, model):
        what = f"step {i + 1}"
        pre = log[-1]["pre"]
        named = clip.named_norms(model)
        assert sorted(named) == sorted(pre) == sorted(names), (what, sorted(named))
        for name in names:
            assert named[name].dim() == 0, (what, name, named[name].shape)
            torch.testing.assert_close(named[name], pre[name], msg=lambda m: f"{what} norm of {name}: {m}")
        vec = clip.param_norms
        assert vec.dtype == torch.float32 and vec.shape == (len(names),), (what, vec.dtype, vec.shape)
        torch.testing.assert_close(
            vec.sort().values, torch.stack(list(pre.values())).sort().values, msg=lambda m: f"{what} param_norms: {m}"
        )

    policy, ref = POLICIES[policy]()
    run_against_reference(policy, ref, mode=mode, optimizer="adam", backend_kwargs={"per_param_norms": True}, after_step=check)
