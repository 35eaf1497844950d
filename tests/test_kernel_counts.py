"""What the clip adds to the generated code of the compiled backward, per model of the zoo.

On CPU, Inductor emits one C++ function per fused kernel, and a function may hold several
loop nests; ``metrics.generated_kernel_count`` counts loop nests. The counts are pinned as
measured on torch 2.13 (CPU) so a change in what the pass inserts, or in how Inductor fuses
it, shows up here. Run this file as a script to print the table.
"""

import re

import pytest
import torch
from torch._inductor import metrics
from torch._inductor.utils import run_and_get_code

import models as zoo
from compileclip import clip_backend


def generated(make_model, make_input, backend) -> tuple[int, int]:
    """(C++ functions, loop nests) generated for one forward+backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make_model()
    compiled = torch.compile(model, backend=backend)
    metrics.reset()

    def step():
        compiled(*make_input(0)).float().pow(2).mean().backward()

    with torch._inductor.config.patch(fx_graph_cache=False):
        _, sources = run_and_get_code(step)
    functions = sum(len(re.findall(r'extern "C"', src)) for src in sources)
    return functions, metrics.generated_kernel_count


ZOO = {
    "mlp": (zoo.mlp, zoo.mlp_input),
    "encoder_layer": (zoo.encoder_layer, zoo.seq_input),
    "gpt_tied": (zoo.TinyGPT, zoo.tokens_input),
    "cnn_batchnorm": (zoo.cnn, zoo.image_input),
    "lstm_cell_loop": (zoo.CellLoop, zoo.rnn_input),
    "deep_mlp_64_tensors": (lambda: torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(32)]),
                            zoo.mlp_input),
}

# (extra C++ functions, extra loop nests) the clip adds, measured on torch 2.13.0+cpu.
# The backward's norms are one extern call (compileclip::grad_norms), no loop nest and no C++
# function of their own; a reduction per gradient would add e.g. 33 loop nests for 64
# gradients (tests/test_constant_kernels.py counts the extern calls too).
PINNED = {
    "mlp": (0, 0),
    "encoder_layer": (0, 0),
    "gpt_tied": (0, 0),
    "cnn_batchnorm": (0, 0),
    "lstm_cell_loop": (0, 0),
    "deep_mlp_64_tensors": (0, 0),
}


def extra(name):
    make_model, make_input = ZOO[name]
    base = generated(make_model, make_input, "inductor")
    clipped = generated(make_model, make_input, clip_backend(max_norm=1.0))
    return clipped[0] - base[0], clipped[1] - base[1], base


@pytest.mark.skipif(not torch.__version__.startswith("2.13"), reason="counts pinned on torch 2.13")
@pytest.mark.parametrize("name", list(ZOO))
def test_extra_kernels(name):
    functions, nests, _ = extra(name)
    assert (functions, nests) == PINNED[name]


if __name__ == "__main__":
    print(f"torch {torch.__version__}; extra = clip_backend minus plain inductor, fwd+bwd")
    print(f"{'model':22} {'base fns':>8} {'base nests':>10} {'+fns':>5} {'+nests':>6}")
    for name in ZOO:
        f, n, base = extra(name)
        print(f"{name:22} {base[0]:8d} {base[1]:10d} {f:5d} {n:6d}")
