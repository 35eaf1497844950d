"""Child process of test_cache.py: compile one model, report whether the step clipped it like eager.

usage: python cache_child.py plain|clip MAX_NORM
Prints one JSON line: the max deviation from eager clip_grad_norm_ and cache counters.
"""

import copy
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import models as zoo  # noqa: E402
from compileclip import clip_backend  # noqa: E402

mode, max_norm = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
model = zoo.mlp(64)
ref = copy.deepcopy(model)
clip = clip_backend(max_norm=max_norm) if mode == "clip" else None
compiled = torch.compile(model, backend=clip) if clip else torch.compile(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
worst = 0.0
for step in range(2):
    x = torch.randn(6, 8)
    for p in [*model.parameters(), *ref.parameters()]:
        p.grad = None
    compiled(x).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    opt.step()  # the clip runs here, with the norm the backward graph computed
    ref_opt.step()
    if clip:
        worst = max(worst, abs(float(clip.total_norm) - float(norm)))
    worst = max(worst, *((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())))
counters = torch._dynamo.utils.counters
print(json.dumps({
    "worst": worst,
    "stats": clip.stats if clip else None,
    "aot_cache": dict(counters["aot_autograd"]),
    "fx_cache": {k: v for k, v in counters["inductor"].items() if "fxgraph_cache" in k},
}))
