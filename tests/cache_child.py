"""Child process of test_cache.py: compile one model in a fresh process (its own Inductor caches).

usage: python cache_child.py plain|clip MAX_NORM
plain: train it under plain torch.compile (fills the caches). clip: train it compiled with the
clip against eager clip_grad_norm_ (``harness.compare_with_eager``: an AssertionError, a nonzero
exit, where it differs). Prints one JSON line: the clip's counters and the cache counters.
"""

import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import models as zoo  # noqa: E402
from harness import compare_with_eager  # noqa: E402
from test_models import sgd, supervised  # noqa: E402

mode, max_norm = sys.argv[1], float(sys.argv[2])
loop, make_models = supervised(zoo.mlp_input), (lambda: [zoo.mlp(64)])
if mode == "clip":
    stats = dict(compare_with_eager(loop, make_models, sgd, max_norm=max_norm).clip.stats)
else:  # no clip, nothing to compare: the same loop, to fill the caches
    torch.manual_seed(0)
    (model,) = make_models()
    compiled, (opt,) = torch.compile(model), sgd([model])
    for i in range(3):
        torch.manual_seed(1000 + i)
        loop([compiled], [opt], None, [opt.step], i)
    stats = None
counters = torch._dynamo.utils.counters
print(json.dumps({
    "stats": stats,
    "aot_cache": dict(counters["aot_autograd"]),
    "fx_cache": {k: v for k, v in counters["inductor"].items() if "fxgraph_cache" in k},
}))
