"""Cache safety: a warm cache from a plain Inductor compile, or from a clip with another
max_norm, must never hand the clip backend an unclipped or wrongly clipped graph. Each clipped
run is compared with eager ``clip_grad_norm_`` (``harness.py``; the fresh processes run
``cache_child.py``) and must have used the norm its own backward graph computed."""

import json
import os
import subprocess
import sys

import pytest
import torch

import models as zoo
from harness import ACTIVE, INACTIVE, compare_with_eager, isolated  # noqa: F401
from test_models import from_backward, sgd, supervised, taken

CHILD = os.path.join(os.path.dirname(__file__), "cache_child.py")


def run_child(cache_dir, *args, **env_vars) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), **env_vars)
    env.pop("TORCHINDUCTOR_AUTOGRAD_CACHE", None) if not env_vars else None
    out = subprocess.run([sys.executable, CHILD, *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]  # a clipped run that differs from eager fails here
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_inductor_then_clip_in_fresh_processes(tmp_path):
    plain = run_child(tmp_path, "plain", 0)
    # the plain run must have filled the caches, or this test proves nothing
    assert plain["aot_cache"].get("autograd_cache_saved", 0) >= 1, plain
    first = run_child(tmp_path, "clip", ACTIVE)  # as eager (the child compares), and:
    # exact is not enough: a cache hit on the plain graph would still be exact, through the
    # norm computed at the step; the norm-computing graph must have been built and used
    assert first["stats"] == from_backward(), first
    second = run_child(tmp_path, "clip", INACTIVE)  # a warm cache from the clip with another max_norm
    assert second["stats"] == from_backward(), second
    assert second["fx_cache"].get("fxgraph_cache_hit", 0) >= 1, second  # and it was used


def test_autograd_cache_forced_by_environment(tmp_path):
    """TORCHINDUCTOR_AUTOGRAD_CACHE=1 overrides config patches; the norm must still come from our graph."""
    plain = run_child(tmp_path, "plain", 0, TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    assert plain["aot_cache"].get("autograd_cache_saved", 0) >= 1, plain
    clipped = run_child(tmp_path, "clip", ACTIVE, TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    assert clipped["stats"] == from_backward(), clipped
    assert not clipped["aot_cache"].get("autograd_cache_hit"), clipped


@pytest.mark.parametrize("norm_types", [(2.0, 2.0), (2.0, 1.0)])
def test_two_backends_in_one_process(norm_types):
    """Same model class compiled twice with different max_norm/norm_type, one process. The first
    clip is kept alive through the second comparison: it must not act on the second's steps."""
    sides = []
    for max_norm, norm_type in zip((ACTIVE, INACTIVE), norm_types):
        torch._dynamo.reset()
        sides.append(compare_with_eager(supervised(zoo.mlp_input), lambda: [zoo.mlp()], sgd,
                                        max_norm=max_norm, norm_type=norm_type))
        assert taken(sides[-1].clip) == from_backward(), sides[-1].clip.stats
    assert taken(sides[0].clip) == from_backward(), sides[0].clip.stats  # untouched by the second
