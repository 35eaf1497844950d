"""More of the scope rule against eager (see ``test_scope.py``): a loop that keeps its own clip, a
learnable loss weight that only the optimizer holds, ``attach(opt, parameters=...)``, an
optimizer of the group that shows up late, and ``clip.remove()``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import ACTIVE, INACTIVE, Leaves, Step, compare_with_eager, isolated, mlp, new_clip, whole_model  # noqa: F401

AOT = {"inner": "aot_eager"}


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def sgd(ms):
    return [torch.optim.SGD(ms[0].parameters(), lr=0.1, momentum=0.9)]


# -- two clips in one loop ----------------------------------------------------------------------


def own_clip_loop(models_, opts, clip, steps, i):
    """A migrated loop that keeps its own ``clip_grad_norm_`` (or the HF Trainer's default)."""
    (model,), (opt,), (step,) = models_, opts, steps
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    step()


def test_own_clip_in_the_loop_warns_at_the_first_step(max_norm):
    """The warning says what happened: the clip sees the other clip's result, total_norm is
    the norm after it, the smaller max_norm wins. All of it true: the result is eager's two
    clips, and total_norm the norm the second clip_grad_norm_ returns."""
    with pytest.warns(UserWarning, match=r"(?s)changed in place between backward\(\) and the optimizer step.*smaller max_norm wins"):
        compare_with_eager(own_clip_loop, lambda: [mlp()], sgd, max_norm=max_norm, iterations=4, **AOT)


def plain_loop(models_, opts, clip, steps, i):
    (model,), (opt,), (step,) = models_, opts, steps
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    step()


def test_plain_loop_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare_with_eager(plain_loop, lambda: [mlp()], sgd, max_norm=ACTIVE, iterations=2, **AOT)


# -- a parameter that only the optimizer holds ------------------------------------------------


class WithLossWeight:
    """A model and a learnable loss weight that the model does not hold (uncertainty weighting)."""

    def __init__(self):
        self.model = mlp()
        self.log_var = nn.Parameter(torch.zeros(()))

    def named_parameters(self):
        return [*self.model.named_parameters(), ("log_var", self.log_var)]

    def parameters(self):
        return [p for _, p in self.named_parameters()]


def loss_weight_loop(models_, opts, clip, steps, i):
    (holder,), (opt,), (step,) = models_, opts, steps
    forward = holder.compiled if hasattr(holder, "compiled") else holder.model
    opt.zero_grad(set_to_none=True)
    mse = F.mse_loss(forward(torch.randn(6, 8)), torch.randn(6, 4))
    (mse * torch.exp(-holder.log_var) + holder.log_var).backward()
    step()


def compile_holder(models_, opts, make):
    clip = make()
    for h in models_:
        h.compiled = torch.compile(h.model, backend=clip)
    return models_, [Step(o, clip) for o in opts]


def test_loss_weight_is_clipped_with_the_model(max_norm):
    """Lightning's convention: eager clip_grad_norm_ over the optimizer's parameters, the weight
    included (the default reference clips each optimizer's parameters)."""
    compare_with_eager(loss_weight_loop, lambda: [WithLossWeight()], lambda hs: [torch.optim.AdamW(hs[0].parameters(), lr=1e-2)],
                       compile_holder, max_norm=max_norm, iterations=4, **AOT)


class ModelOnly:
    """The reference of ``attach(opt, parameters=model.parameters())``: the model only."""

    def __init__(self, max_norm, params):
        self.max_norm, self.params = max_norm, params

    def clip_(self, params):
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)


def test_attach_names_the_parameters(max_norm):
    """``clip.attach(opt, parameters=model.parameters())``: the weight is left out, as eager
    ``clip_grad_norm_(model.parameters())`` leaves it."""
    holders = []

    def make():
        holders.append(WithLossWeight())
        return holders[-1:]

    def setup(models_, opts, new):
        clip = new()
        clip.attach(opts[0], parameters=models_[0].model.parameters())
        return compile_holder(models_, opts, lambda: clip)

    refs = []

    class Reference:
        def clip_(self, params):
            return torch.nn.utils.clip_grad_norm_(refs[0].model.parameters(), max_norm)

    def make_opts(hs):
        refs.append(hs[0])  # the eager copy's optimizer is made first
        return [torch.optim.AdamW(hs[0].parameters(), lr=1e-2)]

    compare_with_eager(loss_weight_loop, make, make_opts, setup, max_norm=max_norm, iterations=3,
                       reference=Reference(), **AOT)


def test_attach_with_no_parameters_leaves_the_steps_alone():
    torch.manual_seed(0)
    model = mlp()
    clip = new_clip(max_norm=ACTIVE, **AOT)
    compiled = torch.compile(model, backend=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = clip.attach(opt, parameters=[])
    F.mse_loss(compiled(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # not clipped
    handle.remove()  # back to the scope rule: clipped
    opt.zero_grad()
    F.mse_loss(compiled(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    opt.step()
    assert torch.equal(clip.total_norm, norm)


def test_remove_stops_the_clip():
    torch.manual_seed(0)
    model = mlp()
    clip = new_clip(max_norm=ACTIVE, **AOT)
    compiled = torch.compile(model, backend=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip.remove()
    F.mse_loss(compiled(torch.randn(6, 8)), torch.randn(6, 4)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


# -- an optimizer of the group that holds more than the model, not stepped yet at the first step --


def _weighted_backward(holder, forward):
    mse = F.mse_loss(forward(torch.randn(6, 8)), torch.randn(6, 4))
    (mse * torch.exp(-holder.log_var) + holder.log_var).backward()


def test_optimizer_made_after_the_first_step_raises_before_its_step():
    """A step clips the model; an AdamW made only afterwards also holds the loss weight, which
    eager would have normed with the model: its step raises (before updating anything) and says
    to attach it. (One made before the first step is found then: the tests below.)"""
    torch.manual_seed(0)
    holder = WithLossWeight()
    clip = new_clip(max_norm=ACTIVE, **AOT)
    compiled = torch.compile(holder.model, backend=clip)
    o1 = torch.optim.SGD([p for p in holder.model.parameters() if p.ndim == 2], lr=0.1)
    _weighted_backward(holder, compiled)
    o1.step()
    rest = [p for p in holder.parameters() if p.ndim != 2]
    o2 = torch.optim.AdamW(rest, lr=1e-2)
    before = [p.detach().clone() for p in rest]
    with pytest.raises(RuntimeError, match=r"(?s)AdamW.step\(\) consumes gradients.*clip\.attach\(optimizer\)"):
        o2.step()
    assert all(torch.equal(p, b) for p, b in zip(rest, before))


@pytest.mark.parametrize("attach", [False, True], ids=["found", "attached"])
def test_second_optimizer_with_the_loss_weight_is_clipped_with_the_group(attach):
    """SGD over the matrices steps first; AdamW holds the biases and the loss weight. The clip
    finds AdamW at the first step (its biases are leaves no known optimizer holds), or is told
    (``attach``): one clip over the model and the weight, as eager ``clip_grad_norm_(model +
    weight)`` before both steps."""
    torch.manual_seed(0)
    holder = WithLossWeight()
    ref = WithLossWeight()
    ref.model.load_state_dict(holder.model.state_dict())
    clip = new_clip(max_norm=ACTIVE, **AOT)
    compiled = torch.compile(holder.model, backend=clip)

    def opts(h):
        mats = [p for p in h.model.parameters() if p.ndim == 2]
        return torch.optim.SGD(mats, lr=0.1), torch.optim.AdamW([p for p in h.parameters() if p.ndim != 2], lr=1e-2)

    (o1, o2), (r1, r2) = opts(holder), opts(ref)
    if attach:
        clip.attach(o1)
        clip.attach(o2)
    for i in range(3):
        torch.manual_seed(100 + i)
        _weighted_backward(holder, compiled)
        torch.manual_seed(100 + i)
        _weighted_backward(ref, ref.model)
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
        o1.step(), o2.step(), r1.step(), r2.step()
        torch.testing.assert_close(clip.total_norm, norm)
        for p, q in zip(holder.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1.3e-6, atol=1e-5 * ACTIVE / float(norm))
            torch.testing.assert_close(p, q)
        for o in (o1, o2, r1, r2):
            o.zero_grad()
    assert clip.stats["step_already_clipped"] == 3, clip.stats


# -- two groups stepped interleaved --------------------------------------------------------------


def interleaved_loop(models_, opts, clip, steps, i):
    """G (two optimizers: matrices and the rest) and D (one), one backward, steps G1, D, G2.
    Eager: clip_grad_norm_(G) before G1, clip_grad_norm_(D) before D, nothing before G2."""
    (g, d), (g1, dd, g2) = models_, steps
    for o in opts:
        o.zero_grad(set_to_none=True)
    z = torch.randn(6, 8)
    (d(g(z)).pow(2).mean() + g(z).pow(2).mean()).backward()
    if clip is None:
        g1.clip_grads(g.parameters())
    g1.raw()
    dd()
    g2.raw()


def interleaved_opts(ms):
    g, d = ms
    mats = [p for p in g.parameters() if p.ndim == 2]
    rest = [p for p in g.parameters() if p.ndim != 2]
    return [torch.optim.SGD(mats, lr=0.1, momentum=0.9), torch.optim.AdamW(d.parameters(), lr=1e-2),
            torch.optim.AdamW(rest, lr=1e-2)]


def test_two_groups_stepped_interleaved(max_norm):
    side = compare_with_eager(interleaved_loop, lambda: [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)),
                                                         mlp()],
                              interleaved_opts, max_norm=max_norm, iterations=3, **AOT)
    assert side.clip.stats["step_already_clipped"] == 3, side.clip.stats


def test_a_step_that_raised_does_not_leave_later_steps_unclipped(max_norm):
    """A loop that catches an exception from ``opt.step()`` (a step hook of its own raising, an
    out-of-memory retry) and goes on: torch runs no post-hook after the exception, so the
    clip's step stays open; the optimizer's next step closes it (with a warning) and is clipped
    as eager clips it, instead of passing for a step nested in the open one."""
    def make():
        torch.manual_seed(0)
        model = mlp()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True)

    def loop(model, opt, run, eager: bool):
        fail = [False]
        opt.register_step_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")) if fail[0] else None)
        out = []
        for i in range(4):
            torch.manual_seed(100 + i)
            opt.zero_grad(set_to_none=True)
            F.mse_loss(run(torch.randn(6, 8)), torch.randn(6, 4)).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if eager else None
            fail[0] = i == 1
            try:
                opt.step()
            except RuntimeError as e:
                assert str(e) == "boom"
            out.append((norm, [p.detach().clone() for p in model.parameters()]))
        return out

    ref_model, ref_opt = make()
    ref = loop(ref_model, ref_opt, ref_model, eager=True)
    model, opt = make()
    clip = new_clip(max_norm=max_norm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = loop(model, opt, torch.compile(model, backend=clip), eager=False)
    for i, ((norm, ps), (_, qs)) in enumerate(zip(ref, got)):
        for p, q in zip(ps, qs):
            torch.testing.assert_close(q, p, msg=lambda m: f"step {i}: {m}")
    torch.testing.assert_close(clip.total_norm, ref[-1][0])
    assert any("raised before it finished" in str(w.message) for w in caught)
