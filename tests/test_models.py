"""The golden-output suite: each model of the zoo (``models.py``) compiled with the clip, against
eager ``clip_grad_norm_`` (``harness.py``): 3 SGD-with-momentum steps on fresh random inputs, the
clip active and inactive, and the path each step took (``clip.stats``). Also the loop, optimizer
and counters that ``test_numerics.py`` and ``test_cache.py`` share."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import models as zoo
from harness import ACTIVE, INACTIVE, compare_with_eager, isolated  # noqa: F401

ITERATIONS = 3  # harness.compare_with_eager's default


@pytest.fixture(params=[ACTIVE, INACTIVE], ids=["active", "inactive"])
def max_norm(request):
    return request.param


def square_mean(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def supervised(make_input, loss_fn=square_mean):
    """The loop: zero_grad, one backward of ``loss_fn(model(*make_input(i)))``, step."""
    def run(models_, opts, clip, steps, i):
        (model,), (opt,), (step,) = models_, opts, steps
        opt.zero_grad(set_to_none=True)
        loss_fn(model(*make_input(i))).backward()
        step()
    return run


def sgd(models_):
    # momentum: the harness compares the optimizer's state (momentum_buffer) too
    return [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models_]


def taken(clip) -> dict:
    """The counters that moved."""
    return {k: v for k, v in clip.stats.items() if v}


def from_backward(steps: int = ITERATIONS, graphs: int = 1) -> dict:
    """The counters of ``steps`` eager optimizer steps of a model compiled with the clip, each
    after one backward of ``graphs`` graphs whose norms cover the gradients the step used."""
    return {"backward_graph_runs": steps * graphs, "step_eager": steps, "norm_from_backward": steps}


CASES = {
    "mlp": (zoo.mlp, zoo.mlp_input, from_backward()),
    "encoder_layer": (zoo.encoder_layer, zoo.seq_input, from_backward()),
    "gpt_tied": (zoo.TinyGPT, zoo.tokens_input, from_backward()),
    # Inductor returns the conv weight gradients in another layout than the parameters', so
    # autograd copies them into .grad: the backward's norm is not that of .grad's tensors,
    # and the step norms the gradients itself (exact either way)
    "cnn_batchnorm": (zoo.cnn, zoo.image_input,
                      {"backward_graph_runs": ITERATIONS, "step_eager": ITERATIONS, "norm_at_step": ITERATIONS}),
    "lstm_cell_loop": (zoo.CellLoop, zoo.rnn_input, from_backward()),
    "frozen": (zoo.frozen, zoo.mlp_input, from_backward()),
    # two graphs per backward, each norm covers its own parameters: combined at the step
    "graph_break": (zoo.GraphBreak, zoo.mlp_input, from_backward(graphs=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_eager(case, max_norm):
    make_model, make_input, stats = CASES[case]
    side = compare_with_eager(supervised(make_input), lambda: [make_model()], sgd, max_norm=max_norm)
    assert taken(side.clip) == stats, side.clip.stats


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_modules_with_allow_rnn_fuse(kind, max_norm):
    # With allow_rnn Dynamo traces nn.LSTM/nn.GRU into the graph and the clip fuses.
    with torch._dynamo.config.patch(allow_rnn=True):
        side = compare_with_eager(supervised(zoo.rnn_input), lambda: [zoo.RNNModel(kind)], sgd, max_norm=max_norm)
    assert taken(side.clip) == from_backward(), side.clip.stats


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_modules_dynamo_skips(kind, max_norm):
    """Without allow_rnn, torch <= 2.14 compile no graph at all for a model holding an
    nn.LSTM/nn.GRU: the backend never runs. The clip then takes the optimizer that steps
    (it knows no other) and clips it eagerly, with a warning that says so; where Dynamo
    compiles part of the model (2.15), the parameters it left out are normed at the step."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        side = compare_with_eager(supervised(zoo.rnn_input), lambda: [zoo.RNNModel(kind)], sgd, max_norm=max_norm)
    graphless = [w for w in caught if "has compiled no graph" in str(w.message)]
    assert bool(graphless) == ("backward_graph_runs" not in side.clip.stats), (side.clip.stats, graphless)
    if graphless:  # every step clipped eagerly, the norm taken at the step
        assert taken(side.clip) == {"step_eager": ITERATIONS, "norm_at_step": ITERATIONS}, side.clip.stats
