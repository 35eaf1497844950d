"""When may a step use the norm the backward graphs computed? Every case where it must not
(the final .grad is not what one graph produced) against eager, with the counters that show
which norm the step used."""

import copy

import pytest
import torch

import models as zoo
from compileclip import clip_backend
from helpers import ACTIVE, INACTIVE, zero_grads


def _train(make_model, loss_of, max_norm, steps=3, **backend_kwargs):
    """SGD steps of a compiled copy and an eager copy (clip_grad_norm_ right before the step);
    after each step: parameters, consumed .grad and total norm."""
    torch.manual_seed(0)
    model = make_model()
    ref = copy.deepcopy(model)
    clip = clip_backend(max_norm=max_norm, **backend_kwargs)
    compiled = torch.compile(model, backend=clip)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref))
    for step in range(steps):
        torch.manual_seed(100 + step)
        x = torch.randn(6, 8)
        zero_grads(model, ref)
        loss_of(model, compiled, x).backward()
        loss_of(ref, ref, x).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        assert (float(norm) > max_norm) == (max_norm == ACTIVE)
        opt.step()
        ref_opt.step()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"step {step} grad {name}: {m}")
            torch.testing.assert_close(p, q, msg=lambda m: f"step {step} param {name}: {m}")
        torch.testing.assert_close(clip.total_norm, norm)
    return clip.stats


def _plain(m, f, x):
    return f(x).pow(2).mean()


CASES = {
    # the norm of one graph that produced every final .grad: used
    "one_graph": (zoo.mlp, _plain, 3, 0),
    # two calls of the compiled model feed one loss: the graph runs twice, its outputs are summed
    "called_twice": (zoo.mlp, lambda m, f, x: f(x).pow(2).mean() + f(x * 2).sum(), 0, 3),
    # an eager L2 term adds to the graph's gradients
    "eager_term": (zoo.mlp, lambda m, f, x: f(x).pow(2).mean() + 0.1 * sum(p.pow(2).sum() for p in m.parameters()), 0, 3),
    # a graph break: two graphs, each norm covers its own parameters
    "graph_break": (zoo.GraphBreak, _plain, 3, 0),
    # frozen parameters have no gradient and are not in the step
    "frozen": (zoo.frozen, _plain, 3, 0),
}


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("case", list(CASES))
def test_handoff(case, max_norm):
    make_model, loss_of, from_backward, at_step = CASES[case]
    stats = _train(make_model, loss_of, max_norm, inner="aot_eager")
    assert stats.get("norm_from_backward", 0) == from_backward, stats
    assert stats.get("norm_at_step", 0) == at_step, stats


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_user_changes_grad_between_backward_and_step(max_norm):
    """An in-place edit bumps the version counter: the step norms the edited gradients."""
    def loss_of(m, f, x):
        loss = f(x).pow(2).mean()
        return _Edit.apply(loss, m)

    stats = _train(zoo.mlp, loss_of, max_norm, inner="aot_eager")
    assert stats.get("norm_at_step", 0) == 3, stats


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


def test_fuse_false_never_uses_backward_norm():
    stats = _train(zoo.mlp, _plain, ACTIVE, fuse=False, inner="aot_eager")
    assert stats.get("norm_from_backward", 0) == 0 and stats["norm_at_step"] == 3, stats


def test_compiled_autograd_takes_norm_at_step():
    """Compiled autograd replaces our backward graphs: no records, the step norms (exact)."""
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        stats = _train(zoo.mlp, _plain, ACTIVE, inner="aot_eager")
    assert stats.get("norm_from_backward", 0) == 0, stats
