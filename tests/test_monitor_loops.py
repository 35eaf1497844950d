"""Monitoring and adaptive thresholds in the loops users have around them (issue 10):

- a GAN: one clip object for the generator and the discriminator, two optimizers. Each
  optimizer's steps have their own norm history and policy statistics (``clip.monitor(opt)``),
  as two eager ZClip objects would; against two eager references.
- resume: ``clip.state_dict()`` saved with a checkpoint and loaded into a fresh clip goes on
  exactly as the uninterrupted run, whose thresholds match the eager reference.
- ``clip.plot``: writes a PNG.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from compileclip import ZScore, clip_backend
from reference_clip import ZScoreRef
from test_step import small_mlp


def _gan():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    disc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    return gen, disc


def test_gan_each_optimizer_has_its_own_statistics():
    gen, disc = _gan()
    ref_gen, ref_disc = copy.deepcopy(gen), copy.deepcopy(disc)
    opt_g, opt_d = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (gen, disc))
    ref_opt_g, ref_opt_d = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref_gen, ref_disc))
    clip = clip_backend(max_norm=ZScore(warmup=3), history=16)
    g_run, d_run = torch.compile(gen, backend=clip), torch.compile(disc, backend=clip)
    ref_g, ref_d = ZScoreRef(warmup=3), ZScoreRef(warmup=3)
    spikes = {6: 40.0, 9: 40.0}  # on the discriminator's loss only
    d_thr, g_thr = [], []
    for i in range(12):
        z, real = torch.randn(8, 4), torch.randn(8, 8)
        for run, r_run, fake_of, opt, ref_opt, ref, thrs, disc_step in (
            (d_run, ref_disc, lambda g: g(z).detach(), opt_d, ref_opt_d, ref_d, d_thr, True),
            (g_run, ref_gen, None, opt_g, ref_opt_g, ref_g, g_thr, False),
        ):
            if disc_step:  # the discriminator: real vs fake
                loss = (d_run(real).mean() - d_run(g_run(z).detach()).mean()) * spikes.get(i, 1.0)
                ref_loss = (ref_disc(real).mean() - ref_disc(ref_gen(z).detach()).mean()) * spikes.get(i, 1.0)
            else:  # the generator, through the discriminator
                loss, ref_loss = -d_run(g_run(z)).mean(), -ref_disc(ref_gen(z)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ref_opt.zero_grad(set_to_none=True)
            ref_loss.backward()
            ref_norm, thr = ref.clip_(ref_opt.param_groups[0]["params"])
            ref_opt.step()
            mon = clip.monitor(opt)
            what = f"step {i} {'disc' if disc_step else 'gen'}"
            torch.testing.assert_close(clip.total_norm, ref_norm, msg=lambda m: f"{what} norm: {m}")
            torch.testing.assert_close(mon.threshold, torch.tensor(thr), msg=lambda m: f"{what} threshold: {m}")
            thrs.append(thr)
        for (name, p), q in zip([*gen.named_parameters(), *disc.named_parameters()],
                                [*ref_gen.parameters(), *ref_disc.parameters()]):
            torch.testing.assert_close(p, q, msg=lambda m: f"step {i} param {name}: {m}")
    assert any(t < float("inf") for t in d_thr), d_thr  # the discriminator's spikes clipped
    assert clip.monitor(opt_d).history.shape == clip.monitor(opt_g).history.shape == (12,)
    with pytest.raises(RuntimeError, match=r"steps of 2 optimizers.*clip.monitor\(optimizer\)"):
        clip.history


def _train(model, opt, clip, steps, start):
    run = torch.compile(model, backend=clip)
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(6, 8, generator=g)
        (run(x).pow(2).mean() * (30.0 if i == 9 else 1.0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_resume_goes_on_as_uninterrupted(tmp_path):
    policy = ZScore(warmup=3)
    torch.manual_seed(0)
    model = small_mlp()
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    whole = clip_backend(max_norm=policy, history=6)
    _train(model, opt, whole, 14, 0)

    torch.manual_seed(0)
    first = small_mlp()
    first.load_state_dict(start)
    opt1 = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    clip1 = clip_backend(max_norm=policy, history=6)
    _train(first, opt1, clip1, 7, 0)
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "clip": clip1.state_dict()}, tmp_path / "ck.pt")
    torch._dynamo.reset()

    ck = torch.load(tmp_path / "ck.pt")
    second = small_mlp()
    second.load_state_dict(ck["model"])
    opt2 = torch.optim.SGD(second.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ck["opt"])
    clip2 = clip_backend(max_norm=policy, history=6)
    clip2.load_state_dict(ck["clip"])  # before the first step
    _train(second, opt2, clip2, 7, 7)

    torch.testing.assert_close(clip2.history, whole.history)
    torch.testing.assert_close(clip2.thresholds, whole.thresholds)
    assert bool((whole.history > whole.thresholds).any())  # the spike at step 9 was clipped
    for p, q in zip(second.parameters(), model.parameters()):
        torch.testing.assert_close(p, q)
    # and the uninterrupted run's thresholds are the eager reference's, given its norms
    ref = ZScoreRef(warmup=3)
    thrs = [ref.threshold(float(n)) for n in _norms_of_all_steps(policy)]
    torch.testing.assert_close(whole.thresholds, torch.tensor(thrs[-6:], dtype=torch.float32))


def _norms_of_all_steps(policy):
    torch.manual_seed(0)
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    clip = clip_backend(max_norm=policy, history=14)
    _train(model, opt, clip, 14, 0)
    return clip.history.tolist()


def test_load_state_dict_checks_the_policy():
    clip = clip_backend(max_norm=ZScore(warmup=3), history=4)
    state = {"steps": 2, "history": torch.zeros(4), "thresholds": torch.zeros(4),
             "policy": [torch.zeros(3)], "policy_kind": "percentile"}
    with pytest.raises(ValueError, match="'percentile' statistics, this clip's policy is 'zscore'"):
        clip.load_state_dict(state)
    with pytest.raises(ValueError, match="saved history holds 4 steps, this clip history=8"):
        clip_backend(max_norm=1.0, history=8).load_state_dict({**state, "policy": None})


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    clip = clip_backend(max_norm=ZScore(warmup=3), history=20)
    _train(model, opt, clip, 12, 0)
    clip.plot(tmp_path / "norms.png")
    data = (tmp_path / "norms.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("overflow_at", [0, 6])
@pytest.mark.parametrize("mode", ["model", "step"])
def test_percentile_grad_scaler_overflow(mode, overflow_at):
    """``model``: the README's model-only AMP loop (``scaler.step(opt)``); on an overflow the
    scaler does not call ``opt.step()``, so the clip never hears that step, while an eager
    AutoClip before ``scaler.step`` sees its inf norm. ``step``: the scaler attached to the
    clip and the step compiled with it, which hears the overflow step (and skips it on the
    device). Nonfinite norms do not count in Percentile's warm-up and window, so all three
    agree (found by review: counting steps made the two modes differ)."""
    import math

    from compileclip import Percentile
    from reference_clip import PercentileRef

    torch.manual_seed(0)
    model = small_mlp()
    ref_model = copy.deepcopy(model)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref_model))
    scaler, ref_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    policy = Percentile(q=0.5, window=4, warmup=2, warmup_max_norm=0.01)
    ref = PercentileRef(q=0.5, window=4, warmup=2, warmup_max_norm=0.01)
    if mode == "model":
        clip = clip_backend(max_norm=policy)
        run, step = torch.compile(model, backend=clip), (lambda: scaler.step(opt))
    else:
        clip = clip_backend(max_norm=policy, scaler=scaler)
        run, step = model, clip.compile_step(opt)
    for i in range(10):
        x = torch.randn(6, 8)
        if i == overflow_at:
            x[0, 0] = math.inf
        scaler.scale(run(x).pow(2).mean()).backward()
        step()
        scaler.update()
        ref_scaler.scale(ref_model(x).pow(2).mean()).backward()
        ref_scaler.unscale_(ref_opt)
        ref_norm, thr = ref.clip_(ref_model.parameters())
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"step {i} param: {m}")
        if math.isfinite(float(ref_norm)):
            torch.testing.assert_close(clip.total_norm, ref_norm, msg=lambda m: f"step {i} norm: {m}")
            torch.testing.assert_close(clip.threshold, torch.tensor(thr, dtype=torch.float32))
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)


def test_low_precision_compiled_step_warns():
    model = nn.Linear(8, 4).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip = clip_backend(max_norm=0.5)
    model(torch.randn(6, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    with pytest.warns(UserWarning, match="about one ulp of that dtype per clipped step"):
        clip.compile_step(opt)()


@pytest.mark.parametrize("loop", ["accumulation", "fused_adam", "closure"])
def test_policy_in_real_loops(loop):
    """ZScore where users would take it next: two micro-batches accumulated before the step
    (model and step compiled with one clip), a fused Adam (which Dynamo does not trace: the
    step hook clips eagerly), and ``opt.step(closure)``. Against eager ZClip, 12 steps, a spike."""
    torch.manual_seed(0)
    model = small_mlp()
    ref_model = copy.deepcopy(model)
    if loop == "fused_adam":
        opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (model, ref_model))
    else:
        opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref_model))
    clip = clip_backend(max_norm=ZScore(warmup=4))
    ref = ZScoreRef(warmup=4)
    run = torch.compile(model, backend=clip)
    step = clip.compile_step(opt) if loop == "accumulation" else opt.step
    ref_step = torch.compile(ref_opt.step) if loop == "accumulation" else ref_opt.step  # control, see test_adaptive
    thrs = []
    for i in range(12):
        xs = [torch.randn(6, 8) for _ in range(2 if loop == "accumulation" else 1)]
        scale = 30.0 if i == 8 else 1.0

        def closure(m=run):
            opt.zero_grad(set_to_none=True)
            loss = m(xs[0]).pow(2).mean() * scale
            loss.backward()
            return loss

        if loop == "closure":
            step(closure)
        else:
            for x in xs:
                (run(x).pow(2).mean() * scale).backward()
            step()
        for x in xs:
            (ref_model(x).pow(2).mean() * scale).backward()
        ref_norm, thr = ref.clip_(ref_model.parameters())
        ref_step()
        thrs.append(thr)
        what = f"{loop} step {i}"
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"{what} param {name}: {m}")
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{what} grad of {name}: {m}")
        torch.testing.assert_close(clip.total_norm, ref_norm, msg=lambda m: f"{what} norm: {m}")
        torch.testing.assert_close(clip.threshold, torch.tensor(thr, dtype=torch.float32))
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    assert thrs[8] < float("inf") and thrs[7] == float("inf"), thrs  # the spike was clipped, others not
