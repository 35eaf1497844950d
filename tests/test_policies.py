"""Value clipping and the nonfinite skip, against eager over several steps; and ``train``, the
loop of this file and of ``test_policies_2.py`` (GradScaler), ``test_adaptive.py``,
``test_monitoring.py``, ``test_monitor_loops.py`` and ``test_gpu.py``.

``train`` runs a small MLP through ``harness.py``: an eager deep copy first, then the compiled
copy, on the same fresh random batches; after every step the parameters, the optimizer state,
the ``.grad`` the step consumed and the total norm, plus the GradScaler's scale where one is
used. The eager reference is what the README tells users our clip replaces:

    scaler.scale(loss).backward(); scaler.unscale_(opt)            # AMP only
    n = clip_grad_norm_(params, max_norm)                          # if max_norm
    clip_grad_value_(params, clip_value)                           # if clip_value
    scaler.step(opt); scaler.update()  /  opt.step()  /  skip when n is nan/inf

Where the clip lives (``MODES``): ``backward`` (model compiled with the clip, eager step),
``step`` (eager model, ``torch.compile(opt.step, backend=clip)``) or ``both`` (one clip object
for both); ``replaced``: ``opt.step`` itself replaced by its compiled version; ``compile_step``:
``clip.compile_step(opt)``, the model eager.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import models
from harness import (ACTIVE, INACTIVE, Step, compare, compiled_side, eager_side, isolated,  # noqa: F401
                     new_clip, step_compiled, train as train_side, whole_model)

MODES = ["backward", "step", "both"]

OPTIMIZERS = {
    "sgd": lambda params, foreach: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=foreach),
    "adam": lambda params, foreach: torch.optim.Adam(params, lr=1e-2, foreach=foreach),
    "adam_fused": lambda params, foreach: torch.optim.Adam(params, lr=1e-2, fused=True),
}


def replaced(models_, opts, make):
    """``opt.step = torch.compile(opt.step, backend=clip)``; the models eager."""
    clip = make()
    for o in opts:
        o.step = torch.compile(o.step, backend=clip)
    return models_, [Step(o, clip) for o in opts]


SETUPS = {"backward": whole_model(), "step": step_compiled(False, direct=True),
          "both": step_compiled(True, direct=True), "replaced": replaced, "compile_step": step_compiled(False)}


def bad_input(x: torch.Tensor, kind: str) -> torch.Tensor:
    x = x.clone()
    x[0, 0] = math.nan if kind == "nan" else math.inf
    return x


class NormThenValue:
    """The eager clip: ``clip_grad_norm_`` (if max_norm), then ``clip_grad_value_`` (if
    clip_value). Returns the pre-clip norm; without max_norm, with skip_nonfinite, the norm
    for the decision only; else None. ``value_active``: per call, whether the value clamp cut."""

    def __init__(self, max_norm=None, clip_value=None, skip_nonfinite=False):
        self.max_norm, self.clip_value, self.skip = max_norm, clip_value, skip_nonfinite
        self.value_active: list[bool] = []

    def clip_(self, params):
        norm = None
        if self.max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        elif self.skip:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.clip_value is not None:
            self.value_active.append(max(float(p.grad.abs().max()) for p in params) > self.clip_value)
            torch.nn.utils.clip_grad_value_(params, self.clip_value)
        return norm


def record_nan(step: Step) -> None:
    """``step.record()`` for eager, whose check (``.grad`` unchanged by the step) ``torch.equal``
    fails for the nan gradients of a skipped step: record without it."""
    step.records.append(([None if p.grad is None else p.grad.clone() for p in step.params()],
                         step.reference.last_norm))


def snapshot(models_) -> list:
    return [[(name, p.detach().clone()) for name, p in m.named_parameters()] for m in models_]


def _close_nan(xs, refs, what: str, values: bool = True) -> None:
    for n, (x, ref) in enumerate(zip(xs, refs)):
        assert (x is None) == (ref is None), f"{what} {n}: None on one side only"
        if values and x is not None:
            torch.testing.assert_close(x, ref, equal_nan=True, msg=lambda m: f"{what} {n}: {m}")


def compare_skipping(trace, ref_trace, initial, max_norm, skipped=(), *, unheard=(), grads_on_skipped=True,
                     state_from: int = 0) -> None:
    """``harness.compare`` for a run whose iterations in ``skipped`` had a nonfinite norm and left
    the parameters alone (eager skipped ``opt.step()``): there the parameters must equal the
    previous iteration's bit for bit, and the norm and ``.grad`` (nan where eager's clip made
    nan) are compared here with ``equal_nan``; ``grads_on_skipped=False``: ``.grad`` not compared.
    In ``unheard`` (a subset) the clip never heard the step (``scaler.step`` skipped it): its side
    recorded nothing, eager's records are not compared. Every other record, every parameter, and
    the optimizer state from iteration ``state_from`` on go to ``compare`` at its tolerances."""
    assert set(unheard) <= set(skipped)
    for i, (records, *_) in enumerate(ref_trace):  # the test is what it says: only these are nonfinite
        for k, r in enumerate(records):
            for _, norm in r:
                assert norm is None or bool(torch.isfinite(norm)) == (i not in skipped), (i, k, norm)
    prev, kept, ref_kept = initial, [], []
    for i, ((records, params, states), (ref_records, ref_params, ref_states)) in enumerate(zip(trace, ref_trace)):
        if i in skipped:
            for named, before in zip(params, prev):
                for (name, p), (_, b) in zip(named, before):
                    assert torch.equal(p, b), f"iteration {i}: {name} changed on a skipped step"
            if i in unheard:
                assert not any(records), f"iteration {i}: the clip heard a step scaler.step skipped"
            else:
                for k, (new, ref) in enumerate(zip(records, ref_records)):
                    assert len(new) == len(ref), (i, k, len(new), len(ref))
                    for (grads, norm), (ref_grads, ref_norm) in zip(new, ref):
                        what = f"iteration {i} (skipped), optimizer {k}"
                        _close_nan([norm], [None if ref_norm is None else ref_norm.float()], f"{what} norm")
                        _close_nan(grads, ref_grads, f"{what} .grad", values=grads_on_skipped)
            records, ref_records = [[] for _ in records], [[] for _ in ref_records]
        if i < state_from:
            states, ref_states = [], []
        kept.append((records, params, states))
        ref_kept.append((ref_records, ref_params, ref_states))
        prev = params
    compare(kept, ref_kept, max_norm)


def compare_run(loop, make_models, make_opts, setup, *, max_norm, reference, iterations: int,
                reference_compile: dict | None = None, reference_compile_step: bool = False, skipped=(),
                unheard=(), grads_on_skipped=True, state_from: int = 0, **clip_kwargs):
    """``harness.compare_with_eager`` with the skipped steps of ``compare_skipping``.
    ``reference_compile_step``: the eager copy's steps through plain ``torch.compile`` (with
    ``reference_compile`` for the models: the control that cancels Inductor's own rounding).
    Returns the compiled side and its trace."""
    torch.manual_seed(0)
    models_ = list(make_models())
    refs = copy.deepcopy(models_)
    eager = eager_side(refs, make_opts(refs), reference, reference_compile)
    if reference_compile_step:
        for s in eager.steps:
            s.fn = torch.compile(s.opt.step)
    ref_trace = train_side(loop, eager, range(iterations))
    initial = snapshot(models_)
    side = compiled_side(models_, make_opts(models_), setup, max_norm=max_norm, **clip_kwargs)
    trace = train_side(loop, side, range(iterations))
    compare_skipping(trace, ref_trace, initial, max_norm if isinstance(max_norm, float) else None, skipped,
                     unheard=unheard, grads_on_skipped=grads_on_skipped, state_from=state_from)
    return side, trace


def train(*, mode, max_norm=None, clip_value=None, skip_nonfinite=False, amp=False, bad_steps=None, steps=4,
          optimizer="adam", foreach=True, backend_kwargs=None, expect_value_active=None, micro_batches=1,
          device="cpu", grads_on_skipped_steps=True, state_from_step=0, scaler_kwargs=None, how=None,
          autocast=False, reference=None, spikes=None, compiled_reference=False, on_step=None, trace=None):
    """Train with the clip placed per ``mode`` and eagerly; compare after every step; return the
    clip. ``bad_steps``: step -> 'nan' or 'inf' put into that step's (last micro-batch's) input;
    ``spikes``: step -> a factor on the loss. ``amp``: a GradScaler per copy (``scaler_kwargs``),
    the clip's attached; ``how`` the compiled copy steps: ``"step"`` (the compiled step; the
    default but in ``backward``), ``"scaler.step"`` (the default in ``backward``), ``"unscale_"``
    (``scaler.unscale_(opt)``, then the step). ``reference``: the eager clip (default
    ``NormThenValue``); ``compiled_reference``: it compiles what the clip's copy compiles, with
    plain ``torch.compile`` (see ``compare_run``). ``on_step(i, clip, model)``:
    more checks, on the compiled copy after each step. ``trace``: a list to get the compiled trace."""
    bad_steps, spikes = bad_steps or {}, spikes or {}
    assert not bad_steps or skip_nonfinite or amp, "a nonfinite step that nothing skips"
    how = how or ("scaler.step" if mode == "backward" else "step")
    reference = reference or NormThenValue(max_norm, clip_value, skip_nonfinite)
    # growth_interval=2 so that the scale also grows within a few steps
    scaler_kwargs = {"init_scale": 2.0**12, "growth_interval": 2, **(scaler_kwargs or {})}
    scalers = {side: torch.amp.GradScaler(device, **scaler_kwargs) for side in ("eager", "compiled")} if amp else {}
    finite, scales = [], {"eager": [], "compiled": []}

    def loop(models_, opts, clip, steps_, i):
        (model,), (opt,), (step,) = models_, opts, steps_
        side = "eager" if clip is None else "compiled"
        if clip is not None and i == 0:  # eager ran first: the bad steps, and only they, were nonfinite
            assert {j for j, f in enumerate(finite) if not f} == set(bad_steps), finite
        scaler = scalers.get(side)
        opt.zero_grad(set_to_none=True)
        xs = [torch.randn(6, 8, device=device) for _ in range(micro_batches)]
        if i in bad_steps:
            xs[-1] = bad_input(xs[-1], bad_steps[i])
        for x in xs:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = model(x).pow(2).mean().float() * spikes.get(i, 1.0)
            (scaler.scale(loss) if amp else loss).backward()
        if clip is None:
            if amp:
                scaler.unscale_(opt)
            step.clip_grads()
            norm = step.reference.last_norm
            ok = norm is None or bool(torch.isfinite(norm))
            if amp and scaler.is_enabled():  # what the scaler's unscale_ found (before any clamp)
                found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()
                ok = ok and not any(float(v) for v in found)
            finite.append(ok)
            if amp:
                scaler.step(opt)
                record_nan(step)
            elif ok:
                step.raw()
            else:  # skip_nonfinite
                record_nan(step)
        elif amp and how == "scaler.step":
            scaler.step(opt)
            if finite[i]:  # else scaler.step did not call opt.step(): the clip never heard it
                step.record()
        else:
            if amp and how == "unscale_":
                scaler.unscale_(opt)  # records found_inf for update(); the step skips on its own
            step()
        if amp:
            scaler.update()
            scales[side].append(scaler.get_scale())
        if clip is not None and on_step is not None:
            on_step(i, clip, getattr(model, "_orig_mod", model))

    make_opts = lambda ms: [OPTIMIZERS[optimizer](ms[0].parameters(), foreach)]  # noqa: E731
    side, compiled_trace = compare_run(
        loop, lambda: [models.mlp().to(device)], make_opts, SETUPS[mode], max_norm=max_norm, reference=reference,
        iterations=steps, reference_compile={} if compiled_reference and mode in ("backward", "both") else None,
        reference_compile_step=compiled_reference and mode != "backward", skipped=set(bad_steps),
        unheard=set(bad_steps) if amp and how == "scaler.step" else set(), grads_on_skipped=grads_on_skipped_steps,
        state_from=state_from_step, clip_value=clip_value, skip_nonfinite=skip_nonfinite,
        scaler=scalers.get("compiled"), **(backend_kwargs or {}))
    if amp:
        assert scales["compiled"] == scales["eager"], scales
    if expect_value_active is not None:
        assert any(reference.value_active) == expect_value_active, reference.value_active
    if trace is not None:
        trace.extend(compiled_trace)
    return side.clip


# -- value clipping ----------------------------------------------------------------------------


@pytest.mark.parametrize("active", [True, False], ids=["active", "inactive"])
@pytest.mark.parametrize("mode", MODES)
def test_clip_value_matches_clip_grad_value_(mode, active):
    clip = train(mode=mode, clip_value=2e-3 if active else 1e6, expect_value_active=active, steps=3)
    with pytest.raises(RuntimeError, match="computes no total norm"):
        clip.total_norm  # noqa: B018


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("mode", MODES)
def test_norm_then_value(mode, max_norm):
    """Both given: clip_grad_norm_ first, then clip_grad_value_ on its result; total_norm is
    the norm before either."""
    train(mode=mode, max_norm=max_norm, clip_value=1e-3, expect_value_active=True, steps=3)


# -- the nonfinite skip ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("mode", ["step", "both"])
def test_skip_nonfinite_leaves_params_and_state(mode, optimizer, kind):
    """A nonfinite step leaves the parameters and the optimizer state (momentum, Adam's
    moments and step count) as they were; training continues and matches eager, which
    skips ``opt.step()`` for that step."""
    clip = train(mode=mode, max_norm=ACTIVE, skip_nonfinite=True, optimizer=optimizer, bad_steps={1: kind, 3: kind},
                 steps=5)
    assert clip.skipped_steps.dtype == torch.int64
    assert int(clip.skipped_steps) == 2


@pytest.mark.parametrize("amp", [False, True], ids=["skip", "amp"])
@pytest.mark.parametrize("mode", ["step", "both"])
def test_skipped_first_step_creates_no_optimizer_state(mode, amp):
    """SGD's momentum buffer is created by the first step's graph: on a skipped first step
    it must not survive (eager skips opt.step() and has no state), or every later update
    would be nan. This is also the usual GradScaler start (the first scale overflows).
    The buffer is removed when the next backward starts (Dynamo installs it after the
    compiled step returns), so the state is compared from step 1 on."""
    clip = train(mode=mode, max_norm=ACTIVE, skip_nonfinite=not amp, amp=amp, optimizer="sgd",
                 bad_steps={0: "inf"}, steps=3, state_from_step=1)
    assert int(clip.skipped_steps) == 1


def test_skipped_first_adam_step_keeps_only_initial_state():
    """Dynamo creates Adam's state (zeros, step 0) before tracing the first step, so a
    skipped first step leaves that initial state where eager has none; every later step
    then equals eager's (Adam starts from exactly those values)."""
    trace = []
    clip = train(mode="step", max_norm=ACTIVE, skip_nonfinite=True, bad_steps={0: "nan"}, steps=3, state_from_step=1,
                 trace=trace)
    (state,) = trace[0][2]  # after the skipped first step
    assert state and all(int(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
                          for st in state), state
    assert int(clip.skipped_steps) == 1


def test_skip_nonfinite_value_clipping_only_first_step_in_both():
    clip = train(mode="both", clip_value=2e-3, skip_nonfinite=True, bad_steps={0: "inf"}, steps=3, state_from_step=1)
    assert int(clip.skipped_steps) == 1


def test_skip_nonfinite_with_value_clipping_only():
    """clip_value alone with the skip: the norm is computed (of the unclipped gradients)
    for the decision only."""
    clip = train(mode="step", clip_value=2e-3, skip_nonfinite=True, bad_steps={1: "nan"}, steps=3)
    assert int(clip.skipped_steps) == 1


def test_skip_nonfinite_inactive_clip():
    clip = train(mode="step", max_norm=INACTIVE, skip_nonfinite=True, bad_steps={2: "inf"}, steps=3)
    assert int(clip.skipped_steps) == 1


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_skip_nonfinite_with_the_clip_in_the_model_only(kind):
    """An eager optimizer step skipped by the hook (one host sync): parameters and state
    untouched, .grad as eager's clip leaves it."""
    clip = train(mode="backward", max_norm=ACTIVE, skip_nonfinite=True, bad_steps={1: kind}, steps=3)
    assert int(clip.skipped_steps) == 1


def test_skip_nonfinite_does_not_sync(monkeypatch):
    """The decision stays on the device: no Tensor.item / __bool__ / __float__ during a step."""
    torch.manual_seed(0)
    model = models.mlp()
    opt = OPTIMIZERS["adam"](model.parameters(), True)
    clip = new_clip(max_norm=ACTIVE, skip_nonfinite=True)
    step = torch.compile(opt.step, backend=clip)
    for _ in range(2):  # compile first
        model(torch.randn(6, 8)).pow(2).mean().backward()
        step()
    model(bad_input(torch.randn(6, 8), "nan")).pow(2).mean().backward()

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync during the step")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    step()
    monkeypatch.undo()
    assert int(clip.skipped_steps) == 1
