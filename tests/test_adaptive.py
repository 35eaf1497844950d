"""Adaptive clipping policies (issue 10) against eager references written from the papers.

``Percentile`` (AutoClip), ``ZScore`` (ZClip, adaptive_scaling) and ``AGC`` (NFNets, unit-wise),
given as ``max_norm``, train a small MLP for 24 steps on fresh random batches next to a deep
copy clipped eagerly by the references in ``reference_clip.py``. The loss is multiplied by 30
at steps 13 and 19 (indices 12 and 18): the gradient norm jumps 20-40x there, so the adaptive
thresholds have something to react to. After every step: parameters, optimizer state,
``.grad`` after the step, ``clip.total_norm`` and ``clip.threshold`` against the reference.
Each test also checks that it is not vacuous: the spikes clip, and some steps do not.

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

import copy
import math

import pytest
import torch

from compileclip import AGC, Percentile, ZScore, clip_backend
from reference_clip import AGCRef, PercentileRef, ZScoreRef
from test_step import OPTIMIZERS, assert_state_close, loss_of, small_mlp

MODES = ["backward", "step", "both"]
STEPS = 24
SPIKES = {12: 30.0, 18: 30.0}  # step index -> factor on the loss (and so on every gradient)


def run_against_reference(
    policy,
    ref,
    *,
    mode: str,
    optimizer: str,
    steps: int = STEPS,
    spikes: dict[int, float] = SPIKES,
    nan_steps: tuple[int, ...] = (),
    backend_kwargs: dict | None = None,
    after_step=None,
):
    """Train with ``clip_backend(max_norm=policy)`` placed per ``mode`` and with ``ref``'s
    eager clip; compare after every step. ``nan_steps``: a nan in that step's input (with
    ``skip_nonfinite`` the reference then skips ``opt.step()``). ``after_step(i, clip, log, model)``
    adds checks. Returns the clip and a log per step: the reference's pre-clip total norm
    (tensor), threshold (float), AGC's clipped units and each gradient's pre-clip norm."""
    torch.manual_seed(0)
    model = small_mlp()
    ref_model = copy.deepcopy(model)
    opt = OPTIMIZERS[optimizer](model.parameters(), True)
    ref_opt = OPTIMIZERS[optimizer](ref_model.parameters(), True)
    backend_kwargs = backend_kwargs or {}
    skip = backend_kwargs.get("skip_nonfinite", False)
    clip = clip_backend(max_norm=policy, **backend_kwargs)
    forward = torch.compile(model, backend=clip) if mode in ("backward", "both") else model
    step = torch.compile(opt.step, backend=clip) if mode in ("step", "both") else opt.step
    # the reference compiles what we compile, with plain Inductor and no clip (see the docstring)
    ref_forward = torch.compile(ref_model) if mode in ("backward", "both") else ref_model
    ref_step = torch.compile(ref_opt.step) if mode in ("step", "both") else ref_opt.step
    log = []
    for i in range(steps):
        x = torch.randn(6, 8)
        if i in nan_steps:
            x[0, 0] = math.nan
        scale = spikes.get(i, 1.0)
        # ours first (see test_policies.py: an unbound clip takes the first optimizer to step)
        (loss_of(forward, x) * scale).backward()
        step()

        (loss_of(ref_forward, x) * scale).backward()
        pre = {n: torch.linalg.vector_norm(q.grad) for n, q in ref_model.named_parameters() if q.grad is not None}
        ref_norm, thr = ref.clip_(ref_model.parameters())
        finite = bool(torch.isfinite(ref_norm))
        if finite or not skip:
            ref_step()

        what = f"step {i + 1}"
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"{what} param {name}: {m}")
            assert (p.grad is None) == (q.grad is None), (what, name)
            torch.testing.assert_close(p.grad, q.grad, equal_nan=not finite, msg=lambda m: f"{what} grad of {name}: {m}")
        assert_state_close(opt, ref_opt, what)
        torch.testing.assert_close(clip.total_norm, ref_norm, equal_nan=True, msg=lambda m: f"{what} total norm: {m}")
        torch.testing.assert_close(
            clip.threshold, torch.tensor(thr, dtype=torch.float32), equal_nan=True,
            msg=lambda m: f"{what} threshold: {m}",
        )
        log.append({"norm": ref_norm, "thr": thr, "clipped": getattr(ref, "clipped", None),
                    "units": getattr(ref, "units", None), "pre": pre})
        if after_step is not None:
            after_step(i, clip, log, model)
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    return clip, log


def assert_not_vacuous(log, spikes=SPIKES) -> None:
    """The spike steps clip (threshold below the norm) and some steps do not."""
    clipped = [e["thr"] < float(e["norm"]) for e in log]
    assert all(clipped[i] for i in spikes), [(float(e["norm"]), e["thr"]) for e in log]
    assert not all(clipped), [(float(e["norm"]), e["thr"]) for e in log]


# -- Percentile (AutoClip) ---------------------------------------------------------------------

PERCENTILE = {  # variant -> (arguments, optimizer)
    "no_warmup_cap": ({"q": 0.9, "window": 8, "warmup": 5}, "adam"),
    "warmup_cap": ({"q": 0.9, "window": 8, "warmup": 5, "warmup_max_norm": 1.0}, "sgd"),
}


@pytest.mark.parametrize("variant", list(PERCENTILE))
@pytest.mark.parametrize("mode", MODES)
def test_percentile(mode, variant):
    """Warm-up steps at warmup_max_norm (inf: no clip), then the 0.9-quantile of the last 8
    norms, the step's own included: a spike is clipped to 30% of the way from the window's
    second largest norm to itself, and the next 7 steps are not clipped."""
    kwargs, optimizer = PERCENTILE[variant]
    _, log = run_against_reference(Percentile(**kwargs), PercentileRef(**kwargs), mode=mode, optimizer=optimizer)
    assert_not_vacuous(log)
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
    "percentile": (Percentile, PercentileRef, {"q": 0.9, "window": 8, "warmup": 5}),
    "zscore": (ZScore, ZScoreRef, {"warmup": 6}),
}


@pytest.mark.parametrize("name", list(NONFINITE))
def test_nonfinite_norm_stays_out_of_the_statistics(name):
    """A nan norm at step 10 (after the warm-ups), skipped with skip_nonfinite: later
    thresholds equal the reference's, whose statistics never see the nan; the history keeps
    it and suggest_max_norm ignores it."""
    policy, ref, kwargs = NONFINITE[name]
    clip, log = run_against_reference(
        policy(**kwargs), ref(**kwargs), mode="step", optimizer="adam", nan_steps=(9,),
        backend_kwargs={"skip_nonfinite": True, "history": STEPS},
    )
    assert int(clip.skipped_steps) == 1
    assert_not_vacuous(log)
    norms = torch.stack([e["norm"] for e in log])
    torch.testing.assert_close(clip.history, norms, equal_nan=True)
    expected = torch.quantile(norms[torch.isfinite(norms)], 0.5)
    torch.testing.assert_close(torch.tensor(clip.suggest_max_norm(q=0.5), dtype=torch.float32), expected)
