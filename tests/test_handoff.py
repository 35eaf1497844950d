"""When may a step use the norm the backward graphs computed? Every case where it must not
(the final .grad is not what one graph produced) against eager ``clip_grad_norm_`` right
before the step, with the clip active and inactive (``harness.py``), and the counters that
show which norm the step used. The model is compiled with the clip; the step is eager."""

from collections import Counter

import pytest
import torch

import models as zoo
from harness import ACTIVE, INACTIVE, compare_with_eager, isolated  # noqa: F401

AOT = {"inner": "aot_eager"}


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def sgd(ms):
    return [torch.optim.SGD(ms[0].parameters(), lr=0.1, momentum=0.9)]


def loop(loss_of):
    """zero_grad, one backward of ``loss_of(model, x)``, step."""
    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        opt.zero_grad(set_to_none=True)
        loss_of(model, torch.randn(6, 8)).backward()
        step()
    return run


def train(make_model, loss_of, max_norm, **clip_kwargs) -> Counter:
    """3 SGD steps against eager; the clip's counters (0 for those never counted)."""
    side = compare_with_eager(loop(loss_of), lambda: [make_model()], sgd, max_norm=max_norm, **AOT, **clip_kwargs)
    return Counter(side.clip.stats)


def _plain(m, x):
    return m(x).pow(2).mean()


CASES = {
    # the norm of one graph that produced every final .grad: used
    "one_graph": (zoo.mlp, _plain, 3, 0),
    # two calls of the compiled model feed one loss: the graph runs twice, its outputs are summed
    "called_twice": (zoo.mlp, lambda m, x: m(x).pow(2).mean() + m(x * 2).sum(), 0, 3),
    # an eager L2 term adds to the graph's gradients
    "eager_term": (zoo.mlp, lambda m, x: m(x).pow(2).mean() + 0.1 * sum(p.pow(2).sum() for p in m.parameters()), 0, 3),
    # a graph break: two graphs, each norm covers its own parameters
    "graph_break": (zoo.GraphBreak, _plain, 3, 0),
    # frozen parameters have no gradient and are not in the step
    "frozen": (zoo.frozen, _plain, 3, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_handoff(case, max_norm):
    make_model, loss_of, from_backward, at_step = CASES[case]
    stats = train(make_model, loss_of, max_norm)
    assert stats["norm_from_backward"] == from_backward, stats
    assert stats["norm_at_step"] == at_step, stats
    assert stats["step_eager"] == 3, stats  # the step is not compiled: every one clips at the pre-hook


def test_user_changes_grad_between_backward_and_step(max_norm):
    """An in-place edit bumps the version counter: the step norms the edited gradients."""
    def loss_of(m, x):
        return _Edit.apply(m(x).pow(2).mean(), m)

    with pytest.warns(UserWarning, match="the gradients were changed in place between backward"):
        stats = train(zoo.mlp, loss_of, max_norm)
    assert stats["norm_at_step"] == 3, stats


class _Edit(torch.autograd.Function):
    """Identity forward; at the end of backward, halve every .grad in place (as a user's
    post-accumulate hook or a custom reducer might)."""

    @staticmethod
    def forward(ctx, loss, m):
        ctx.m = m
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        m = ctx.m
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: [p.grad.mul_(0.5) for p in m.parameters() if p.grad is not None])
        return g, None


def test_fuse_false_never_uses_backward_norm(max_norm):
    stats = train(zoo.mlp, _plain, max_norm, fuse=False)
    assert stats["norm_from_backward"] == 0 and stats["norm_at_step"] == 3, stats


def test_compiled_autograd_takes_norm_at_step(max_norm):
    """Compiled autograd replaces our backward graphs: no records, the step norms (exact)."""
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        stats = train(zoo.mlp, _plain, max_norm)
    assert stats["norm_from_backward"] == 0 and stats["norm_at_step"] == 3, stats
