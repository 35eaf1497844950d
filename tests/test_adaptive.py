"""Adaptive clipping policies (issue 10) against eager references written from the papers.

``Percentile`` (AutoClip), ``ZScore`` (ZClip, adaptive_scaling) and ``AGC`` (NFNets, unit-wise),
given as ``max_norm``, train a small MLP for 24 steps (``train`` of ``test_policies.py``, on
``harness.py``) next to a deep copy clipped eagerly by the references in ``reference_clip.py``,
on the same fresh random batches. The loss is multiplied by 30 at steps 13 and 19 (indices 12
and 18): the gradient norm jumps 20-40x there, so the adaptive thresholds have something to
react to. After every step: parameters, optimizer state, ``.grad`` after the step,
``clip.total_norm`` and ``clip.threshold`` against the reference. Each test also checks that
it is not vacuous: the spikes clip, and some steps do not.

Where the clip lives, as in test_policies.py: ``backward`` (model compiled with the clip,
eager ``opt.step()``), ``step`` (eager model, step compiled with the clip) or ``both``.

The reference compiles what the clip's side compiles (model, step), with plain
``torch.compile`` and no clip; its clip stays eager. Over 24 steps Inductor's own rounding
is not negligible: control, plain ``torch.compile(opt.step)`` without any clip against eager
Adam on this loop fails the default tolerance at the unclipped spike, step 13 (``.grad`` of
``0.weight``: 17/128 elements, 3.7e-5 absolute), exactly as an inactive AGC did against an
eager reference. With the compiled reference that rounding cancels and the default
tolerances hold.
"""

from __future__ import annotations

import math

import pytest
import torch

import models
from compileclip import AGC, Percentile, ZScore
from harness import isolated  # noqa: F401
from reference_clip import AGCRef, PercentileRef, ZScoreRef
from test_policies import MODES, train

STEPS = 24
SPIKES = {12: 30.0, 18: 30.0}  # step index -> factor on the loss (and so on every gradient)


class Logged:
    """A reference of ``reference_clip.py`` that logs every clip: the pre-clip total norm
    (tensor), the threshold (float), AGC's clipped units, and each gradient's pre-clip norm."""

    def __init__(self, ref, names=None):
        self.ref, self.log = ref, []
        # the optimizer's order: the model's (by default test_policies' MLP)
        self.names = [n for n, _ in models.mlp().named_parameters()] if names is None else names

    def clip_(self, params):
        assert len(params) == len(self.names)
        pre = {n: torch.linalg.vector_norm(p.grad) for n, p in zip(self.names, params)}
        total, thr = self.ref.clip_(params)
        self.log.append({"norm": total, "thr": thr, "clipped": getattr(self.ref, "clipped", None),
                         "units": getattr(self.ref, "units", None), "pre": pre})
        return total, thr


def run_against_reference(policy, ref, *, mode: str, optimizer: str, steps: int = STEPS, spikes=SPIKES,
                          after_step=None, **kwargs):
    """Train with ``clip_backend(max_norm=policy)`` placed per ``mode`` and with ``ref``'s eager
    clip; compare after every step (``train``; ``kwargs`` go to it), and ``clip.threshold``
    after every step. ``after_step(i, clip, log, model)`` adds checks, with the reference's log
    up to that step. Returns the clip and the reference's log, one entry per step."""
    logged = Logged(ref)

    def on_step(i, clip, model):
        thr = logged.log[i]["thr"]
        torch.testing.assert_close(clip.threshold, torch.tensor(thr, dtype=torch.float32), equal_nan=True,
                                   msg=lambda m: f"step {i + 1} threshold: {m}")
        if after_step is not None:
            after_step(i, clip, logged.log[: i + 1], model)

    clip = train(mode=mode, max_norm=policy, reference=logged, optimizer=optimizer, steps=steps, spikes=spikes,
                 compiled_reference=True, on_step=on_step, **kwargs)
    assert len(logged.log) == steps
    return clip, logged.log


def assert_not_vacuous(log, spikes=SPIKES) -> None:
    """The spike steps clip (threshold below the norm) and some steps do not."""
    clipped = [e["thr"] < float(e["norm"]) for e in log]
    assert all(clipped[i] for i in spikes), [(float(e["norm"]), e["thr"]) for e in log]
    assert not all(clipped), [(float(e["norm"]), e["thr"]) for e in log]


# -- Percentile (AutoClip) ---------------------------------------------------------------------

# SGD's norms grow over this loop, Adam's shrink: Adam's second spike is smaller than its first,
# and does not clip with the first in its window. Its window (5) is shorter than the spikes' distance
PERCENTILE = {  # variant -> (arguments, optimizer)
    "no_warmup_cap": ({"q": 0.9, "window": 5, "warmup": 5}, "adam"),
    "warmup_cap": ({"q": 0.9, "window": 8, "warmup": 5, "warmup_max_norm": 1.0}, "sgd"),
}


@pytest.mark.parametrize("variant", list(PERCENTILE))
@pytest.mark.parametrize("mode", MODES)
def test_percentile(mode, variant):
    """Warm-up steps at warmup_max_norm (inf: no clip), then the 0.9-quantile of the last
    ``window`` norms, the step's own included: a spike is clipped part of the way from the
    window's second largest norm to itself, and the next steps, while it is in the window,
    are not clipped."""
    kwargs, optimizer = PERCENTILE[variant]
    _, log = run_against_reference(Percentile(**kwargs), PercentileRef(**kwargs), mode=mode, optimizer=optimizer)
    assert_not_vacuous(log)
    after = {i + k for i in SPIKES for k in range(1, kwargs["window"]) if i + k < STEPS} - set(SPIKES)
    assert not any(log[i]["thr"] < float(log[i]["norm"]) for i in after), [(float(e["norm"]), e["thr"]) for e in log]
    warm = [e["thr"] for e in log[:5]]
    assert warm == [kwargs.get("warmup_max_norm", math.inf)] * 5
    if "warmup_max_norm" in kwargs:  # the warm-up cap clips some steps and not others
        assert len({e["thr"] < float(e["norm"]) for e in log[:5]}) == 2


# -- ZScore (ZClip) ----------------------------------------------------------------------------

ZSCORE = {
    "uncapped": ({"warmup": 6}, "sgd"),
    "max_norm_cap": ({"warmup": 6, "max_norm": 0.6}, "adam"),
}


@pytest.mark.parametrize("variant", list(ZSCORE))
@pytest.mark.parametrize("mode", MODES)
def test_zscore(mode, variant):
    """Warm-up for 6 steps at max_norm (inf: no clip); then only z > 2.5 clips, to
    mu + 2.5 sigma / (z / 2.5); the cap clips at max_norm on every other step."""
    kwargs, optimizer = ZSCORE[variant]
    _, log = run_against_reference(ZScore(**kwargs), ZScoreRef(**kwargs), mode=mode, optimizer=optimizer)
    assert_not_vacuous(log)
    if "max_norm" not in kwargs:  # only the spikes clip
        assert [i for i, e in enumerate(log) if math.isfinite(e["thr"])] == sorted(SPIKES)


# -- AGC (NFNets) ------------------------------------------------------------------------------

AGC_CASES = {"active": (0.1, "sgd"), "default": (None, "adam"), "inactive": (1e3, "adam")}


@pytest.mark.parametrize("variant", list(AGC_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_agc(mode, variant):
    """Unit-wise: clipping=0.1 scales some rows and leaves others (the LayerNorm bias starts
    at zero: its bound is clipping * eps); the default 0.01 scales nearly every unit at every
    step; 1e3 scales nothing. Thresholds are nan."""
    clipping, optimizer = AGC_CASES[variant]
    kwargs = {} if clipping is None else {"clipping": clipping}  # None: the defaults
    _, log = run_against_reference(AGC(**kwargs), AGCRef(**kwargs), mode=mode, optimizer=optimizer)
    assert all(math.isnan(e["thr"]) for e in log)
    counts = [e["clipped"] for e in log]
    if variant == "inactive":
        assert not any(counts), counts
    else:
        assert all(counts[i] > 0 for i in SPIKES), counts
        assert any(0 < c < e["units"] for c, e in zip(counts, log)), counts


# -- nonfinite norms ---------------------------------------------------------------------------


NONFINITE = {
    "percentile": (Percentile, PercentileRef, {"q": 0.9, "window": 5, "warmup": 5}),
    "zscore": (ZScore, ZScoreRef, {"warmup": 6}),
}


@pytest.mark.parametrize("name", list(NONFINITE))
def test_nonfinite_norm_stays_out_of_the_statistics(name):
    """A nan norm at step 10 (after the warm-ups), skipped with skip_nonfinite: later
    thresholds equal the reference's, whose statistics never see the nan; the history keeps
    it and suggest_max_norm ignores it."""
    policy, ref, kwargs = NONFINITE[name]
    clip, log = run_against_reference(
        policy(**kwargs), ref(**kwargs), mode="step", optimizer="adam", bad_steps={9: "nan"}, skip_nonfinite=True,
        backend_kwargs={"history": STEPS},
    )
    assert int(clip.skipped_steps) == 1
    assert_not_vacuous(log)
    norms = torch.stack([e["norm"] for e in log])
    torch.testing.assert_close(clip.history, norms, equal_nan=True)
    expected = torch.quantile(norms[torch.isfinite(norms)], 0.5)
    torch.testing.assert_close(torch.tensor(clip.suggest_max_norm(q=0.5), dtype=torch.float32), expected)
