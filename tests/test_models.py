"""The golden-output suite: each model of the zoo against eager clip_grad_norm_."""

import pytest
import torch
import torch.nn as nn

import models as zoo
from helpers import ACTIVE, INACTIVE, compare_with_eager

FUSED = {"probe": 1, "fused": 1}  # 2 steps: the first checks, the second fuses

CASES = {
    "mlp": (zoo.mlp, zoo.mlp_input, FUSED),
    "encoder_layer": (zoo.encoder_layer, zoo.seq_input, FUSED),
    "gpt_tied": (zoo.TinyGPT, zoo.tokens_input, FUSED),
    "cnn_batchnorm": (zoo.cnn, zoo.image_input, FUSED),
    "lstm_cell_loop": (zoo.CellLoop, zoo.rnn_input, FUSED),
    "frozen": (zoo.frozen, zoo.mlp_input, FUSED),
    "graph_break": (zoo.GraphBreak, zoo.mlp_input, {"deferred": 2}),
}


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_eager(case, max_norm):
    make_model, make_input, stats = CASES[case]
    with pytest.warns(UserWarning, match="graph break") if stats.get("deferred") else _nothing():
        compare_with_eager(make_model, make_input, max_norm=max_norm, expect_stats=stats)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_modules_with_allow_rnn_fuse(kind):
    # With allow_rnn Dynamo traces nn.LSTM/nn.GRU into the graph and the clip fuses.
    with torch._dynamo.config.patch(allow_rnn=True):
        compare_with_eager(lambda: zoo.RNNModel(kind), zoo.rnn_input, expect_stats=FUSED)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_rnn_modules_dynamo_skips(kind):
    """Without allow_rnn, torch 2.11/2.13 compile no graph at all for a model holding an
    nn.LSTM/nn.GRU: the backend never runs and cannot clip. It must then say so, not
    report a norm. Where Dynamo compiles part of the model (2.15), the parameters it
    left out receive gradients the hooks see, and the clip takes the exact path."""
    torch.manual_seed(0)
    model = zoo.RNNModel(kind)
    from compileclip import clip_backend

    clip = clip_backend(max_norm=ACTIVE)
    compiled = torch.compile(model, backend=clip)
    compiled(*zoo.rnn_input(0)).pow(2).mean().backward()
    if clip.stats["deferred"] or clip.stats["probe"]:
        # some graph was compiled: the result must be eager's (checked in full below)
        torch._dynamo.reset()
        compare_with_eager(lambda: zoo.RNNModel(kind), zoo.rnn_input)
    else:
        with pytest.raises(RuntimeError, match="no graph was compiled"):
            clip.total_norm


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
