"""The golden-output suite: each model of the zoo against eager clip_grad_norm_."""

import warnings

import pytest
import torch
import torch.nn as nn

import models as zoo
from helpers import ACTIVE, INACTIVE, compare_with_eager, from_backward

FUSED = from_backward(2)  # 2 steps, each using the norm its backward graph computed

CASES = {
    "mlp": (zoo.mlp, zoo.mlp_input, FUSED),
    "encoder_layer": (zoo.encoder_layer, zoo.seq_input, FUSED),
    "gpt_tied": (zoo.TinyGPT, zoo.tokens_input, FUSED),
    # Inductor returns the conv weight gradients in another layout than the parameters', so
    # autograd copies them into .grad: the backward's norm is not that of .grad's tensors,
    # and the step norms the gradients itself (exact either way)
    "cnn_batchnorm": (zoo.cnn, zoo.image_input, {"backward_graph_runs": 2, "step_eager": 2, "norm_at_step": 2}),
    "lstm_cell_loop": (zoo.CellLoop, zoo.rnn_input, FUSED),
    "frozen": (zoo.frozen, zoo.mlp_input, FUSED),
    # two graphs per backward, each norm covers its own parameters: combined at the step
    "graph_break": (zoo.GraphBreak, zoo.mlp_input, from_backward(2, graphs=2)),
}


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_eager(case, max_norm):
    make_model, make_input, stats = CASES[case]
    compare_with_eager(make_model, make_input, max_norm=max_norm, expect_stats=stats)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_modules_with_allow_rnn_fuse(kind):
    # With allow_rnn Dynamo traces nn.LSTM/nn.GRU into the graph and the clip fuses.
    with torch._dynamo.config.patch(allow_rnn=True):
        compare_with_eager(lambda: zoo.RNNModel(kind), zoo.rnn_input, expect_stats=FUSED)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_modules_dynamo_skips(kind):
    """Without allow_rnn, torch <= 2.14 compile no graph at all for a model holding an
    nn.LSTM/nn.GRU: the backend never runs. The clip then takes the optimizer that steps
    (it knows no other) and clips it eagerly, with a warning that says so; where Dynamo
    compiles part of the model (2.15), the parameters it left out are normed at the step."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = compare_with_eager(lambda: zoo.RNNModel(kind), zoo.rnn_input)
    graphless = [w for w in caught if "has compiled no graph" in str(w.message)]
    assert bool(graphless) == ("backward_graph_runs" not in clip.stats), (clip.stats, graphless)
