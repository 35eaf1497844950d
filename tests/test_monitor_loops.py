"""Monitoring and adaptive thresholds in the loops users have around them (issue 10), against
eager references of ``reference_clip.py`` on ``harness.py`` (parameters, ``.grad`` after each
step, optimizer state and total norm after every step; thresholds and histories too):

- a GAN: one clip object for the generator and the discriminator, compiled separately, two
  optimizers: two groups, each with its own norm history and policy statistics
  (``clip.monitor(opt)``), as two eager ZClip objects would have.
- resume: ``clip.state_dict()`` saved with a checkpoint and loaded into a fresh clip goes on
  exactly as the uninterrupted eager run.
- Percentile with a GradScaler overflow; ZScore with accumulation, a fused Adam, a closure.
- ``clip.plot``: writes a PNG.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import models
from compileclip import Percentile, ZScore
from harness import (compare, compare_with_eager, compiled_side, eager_side, isolated, new_clip,  # noqa: F401
                     step_compiled, train as train_side, whole_model)
from reference_clip import PercentileRef, ZScoreRef
from test_adaptive import Logged
from test_policies import compare_run, train

INF = math.inf


def assert_monitor(mon, log, n: int, what: str) -> None:
    """A monitor's history and thresholds are the reference's last ``n`` norms and thresholds."""
    last = log[-n:]
    torch.testing.assert_close(mon.history, torch.stack([e["norm"] for e in last]),
                               msg=lambda m: f"{what} history: {m}")
    torch.testing.assert_close(mon.thresholds, torch.tensor([e["thr"] for e in last], dtype=torch.float32),
                               msg=lambda m: f"{what} thresholds: {m}")


def assert_threshold(mon, entry: dict, what: str) -> None:
    torch.testing.assert_close(mon.threshold, torch.tensor(entry["thr"], dtype=torch.float32),
                               msg=lambda m: f"{what} threshold: {m}")


# -- a GAN ---------------------------------------------------------------------------------------


def gan():
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    disc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    return gen, disc


def test_gan_each_optimizer_has_its_own_statistics():
    spikes = {6: 40.0, 9: 40.0}  # on the discriminator's loss only
    torch.manual_seed(0)
    models_ = list(gan())
    refs = copy.deepcopy(models_)
    # an eager ZClip per optimizer
    logs = {name: Logged(ZScoreRef(warmup=3), names=[n for n, _ in m.named_parameters()])
            for name, m in zip(("gen", "disc"), refs)}

    def loop(models_, opts, clip, steps, i):
        (gen, disc), (opt_g, opt_d), (step_g, step_d) = models_, opts, steps
        z, real = torch.randn(8, 4), torch.randn(8, 8)
        opt_d.zero_grad(set_to_none=True)  # the discriminator: real vs fake
        ((disc(real).mean() - disc(gen(z).detach()).mean()) * spikes.get(i, 1.0)).backward()
        step_d()
        opt_g.zero_grad(set_to_none=True)  # the generator, through the discriminator
        (-disc(gen(z)).mean()).backward()
        step_g()
        if clip is not None:
            for name, opt in (("disc", opt_d), ("gen", opt_g)):
                assert_threshold(clip.monitor(opt), logs[name].log[i], f"step {i} {name}")

    sgd = lambda ms: [torch.optim.SGD(m.parameters(), lr=0.05) for m in ms]  # noqa: E731
    eager = eager_side(refs, sgd(refs), None)
    for step, log in zip(eager.steps, logs.values()):
        step.reference = log
    ref_trace = train_side(loop, eager, range(12))
    side = compiled_side(models_, sgd(models_), whole_model(), max_norm=ZScore(warmup=3), history=16)
    compare(train_side(loop, side, range(12)), ref_trace, None)
    (opt_g, opt_d), clip = side.opts, side.clip
    assert_monitor(clip.monitor(opt_d), logs["disc"].log, 12, "disc")
    assert_monitor(clip.monitor(opt_g), logs["gen"].log, 12, "gen")
    clipped = [e["thr"] < float(e["norm"]) for e in logs["disc"].log]
    assert all(clipped[i] for i in spikes) and not all(clipped), clipped  # the discriminator's spikes clipped
    with pytest.raises(RuntimeError, match=r"steps of 2 groups.*clip.monitor\(optimizer\)"):
        clip.history  # noqa: B018


# -- resume from a checkpoint --------------------------------------------------------------------


def spike_loop(models_, opts, clip, steps, i, check=None):
    (model,), (opt,), (step,) = models_, opts, steps
    opt.zero_grad(set_to_none=True)
    (model(torch.randn(6, 8)).pow(2).mean() * (30.0 if i == 9 else 1.0)).backward()
    step()
    if clip is not None and check is not None:
        check(i, clip)


def sgd(ms):
    return [torch.optim.SGD(ms[0].parameters(), lr=0.05, momentum=0.9)]


def test_resume_goes_on_as_uninterrupted(tmp_path):
    """7 steps, a checkpoint of model, optimizer and ``clip.state_dict()``, a fresh process's
    worth of state (new model, optimizer, clip, ``torch._dynamo.reset()``), 7 more steps: the
    14 steps, the history of 6 (across the checkpoint) and the thresholds are those of one
    uninterrupted eager run."""
    policy, logged = ZScore(warmup=3), Logged(ZScoreRef(warmup=3))

    def check(i, clip):
        assert_threshold(clip, logged.log[i], f"step {i}")
        assert_monitor(clip, logged.log[: i + 1], 6, f"step {i}")

    loop = lambda *args: spike_loop(*args, check=check)  # noqa: E731
    torch.manual_seed(0)
    model = models.mlp()
    ref = copy.deepcopy(model)
    ref_trace = train_side(loop, eager_side([ref], sgd([ref]), logged), range(14))  # uninterrupted
    first = compiled_side([model], sgd([model]), whole_model(), max_norm=policy, history=6)
    trace = train_side(loop, first, range(7))
    torch.save({"model": model.state_dict(), "opt": first.opts[0].state_dict(), "clip": first.clip.state_dict()},
               tmp_path / "ck.pt")
    del first
    torch._dynamo.reset()

    ck = torch.load(tmp_path / "ck.pt")
    torch.manual_seed(123)  # a different init, overwritten by the checkpoint
    second = models.mlp()
    second.load_state_dict(ck["model"])
    (opt2,) = sgd([second])
    opt2.load_state_dict(ck["opt"])
    resumed = compiled_side([second], [opt2], whole_model(), max_norm=policy, history=6)
    resumed.clip.load_state_dict(ck["clip"])  # before the first step
    trace += train_side(loop, resumed, range(7, 14))
    compare(trace, ref_trace, None)
    assert logged.log[9]["thr"] < float(logged.log[9]["norm"])  # the spike at step 9 was clipped
    assert all(e["thr"] == INF for i, e in enumerate(logged.log) if i != 9)  # and nothing else


def test_load_state_dict_checks_the_policy():
    clip = new_clip(max_norm=ZScore(warmup=3), history=4)
    state = {"steps": 2, "history": torch.zeros(4), "thresholds": torch.zeros(4),
             "policy": [torch.zeros(3)], "policy_kind": "percentile"}
    with pytest.raises(ValueError, match="'percentile' statistics, this clip's policy is 'zscore'"):
        clip.load_state_dict(state)
    with pytest.raises(ValueError, match="saved history holds 4 steps, this clip history=8"):
        new_clip(max_norm=1.0, history=8).load_state_dict({**state, "policy": None})


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    side = compare_with_eager(spike_loop, lambda: [models.mlp()], sgd, max_norm=ZScore(warmup=3),
                              reference=ZScoreRef(warmup=3), iterations=12, history=20)
    side.clip.plot(tmp_path / "norms.png")
    data = (tmp_path / "norms.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# -- Percentile with a GradScaler overflow -------------------------------------------------------


@pytest.mark.parametrize("overflow_at", [0, 6])
@pytest.mark.parametrize("mode", ["model", "step"])
def test_percentile_grad_scaler_overflow(mode, overflow_at):
    """``model``: the README's model-only AMP loop (``scaler.step(opt)``); on an overflow the
    scaler does not call ``opt.step()``, so the clip never hears that step, while an eager
    AutoClip before ``scaler.step`` sees its inf norm. ``step``: the scaler attached to the
    clip and ``clip.compile_step(opt)``, which hears the overflow step (and skips it on the
    device). Nonfinite norms do not count in Percentile's warm-up and window, so all three
    agree (found by review: counting steps made the two modes differ)."""
    kwargs = dict(q=0.5, window=4, warmup=2, warmup_max_norm=0.01)
    logged = Logged(PercentileRef(**kwargs))

    def check(i, clip, model):
        if mode == "step" or i != overflow_at:  # else the clip never heard the step
            assert_threshold(clip, logged.log[i], f"step {i}")

    clip = train(mode="backward" if mode == "model" else "compile_step", max_norm=Percentile(**kwargs),
                 reference=logged, amp=True, optimizer="sgd", bad_steps={overflow_at: "inf"}, steps=10, on_step=check)
    assert int(clip.skipped_steps) == (1 if mode == "step" else 0)
    thr = [e["thr"] for e in logged.log]
    assert len({t < float(e["norm"]) for t, e in zip(thr, logged.log) if t < INF}) == 2, thr  # some clip, some not


# -- ZScore in real loops ------------------------------------------------------------------------


def zscore_loop(kind: str, logged: Logged):
    def loop(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        xs = [torch.randn(6, 8) for _ in range(2 if kind == "accumulation" else 1)]
        scale = 30.0 if i == 8 else 1.0
        if kind == "closure":
            def closure():
                opt.zero_grad(set_to_none=True)
                loss = model(xs[0]).pow(2).mean() * scale
                loss.backward()
                if clip is None:  # eager: clip after the closure's backward
                    step.clip_grads()
                return loss

            step.raw(closure)
        else:
            opt.zero_grad(set_to_none=True)
            for x in xs:
                (model(x).pow(2).mean() * scale).backward()
            step()
        if clip is not None:
            assert_threshold(clip, logged.log[i], f"{kind} step {i}")
    return loop


@pytest.mark.parametrize("kind", ["accumulation", "fused_adam", "closure"])
def test_policy_in_real_loops(kind):
    """ZScore where users would take it next: two micro-batches accumulated before the step
    (model and step compiled with one clip; the reference's step through plain
    ``torch.compile``, the control of test_adaptive), a fused Adam (which Dynamo does not trace:
    the step hook clips eagerly), and ``opt.step(closure)``. Against eager ZClip, 12 steps, a spike."""
    logged = Logged(ZScoreRef(warmup=4))
    if kind == "fused_adam":
        make_opts = lambda ms: [torch.optim.Adam(ms[0].parameters(), lr=1e-2, fused=True)]  # noqa: E731
    else:
        make_opts = lambda ms: [torch.optim.SGD(ms[0].parameters(), lr=0.05, momentum=0.9)]  # noqa: E731
    side, _ = compare_run(zscore_loop(kind, logged), lambda: [models.mlp()], make_opts,
                          step_compiled(True) if kind == "accumulation" else whole_model(), max_norm=ZScore(warmup=4),
                          reference=logged, iterations=12, reference_compile_step=kind == "accumulation")
    thrs = [e["thr"] for e in logged.log]
    assert thrs[8] < float(logged.log[8]["norm"]) and thrs[7] == INF, thrs  # the spike was clipped, others not
    assert all(t == INF for i, t in enumerate(thrs) if i != 8), thrs
    stats = side.clip.stats
    if kind == "closure":  # each step's norm from the backward's records or computed at the step
        assert stats.pop("norm_from_backward", 0) + stats.pop("norm_at_step", 0) == 12, side.clip.stats
    expected = {  # accumulation: the first step before the step graph exists, its norm the step's own
        "accumulation": {"backward_graph_runs": 24, "step_eager": 1, "norm_at_step": 1, "step_in_graph": 11},
        # fused_adam: the coefficient folded into the fused kernel through opt.grad_scale (no scale pass)
        "fused_adam": {"backward_graph_runs": 12, "step_eager": 12, "norm_from_backward": 12, "scale_folded": 12},
        "closure": {"backward_graph_runs": 12, "step_after_closure": 12}}[kind]
    assert stats == expected, side.clip.stats


def test_low_precision_compiled_step_warns():
    model = nn.Linear(8, 4).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip = new_clip(max_norm=0.5)
    model(torch.randn(6, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    with pytest.warns(UserWarning, match="about one ulp of that dtype per clipped step"):
        clip.compile_step(opt)()
