"""Bad configuration raises at construction, naming the argument, the value and what is
allowed, before anything is compiled."""

import dataclasses
import math

import pytest
import torch

from compileclip import AGC, ClipConfig, Percentile, ZScore, clip_backend


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"max_norm": -1.0}, ValueError, r"max_norm=-1\.0 .* >= 0"),
        ({"max_norm": math.nan}, ValueError, r"max_norm=nan .* >= 0"),
        ({"max_norm": "1.0"}, TypeError, r"max_norm must be a float >= 0.* got str '1\.0'"),
        ({"max_norm": True}, TypeError, r"max_norm must be .* got bool True"),
        ({"max_norm": torch.tensor([1.0, 2.0])}, TypeError, r"max_norm as a tensor must be a 0-d floating point tensor, got shape \(2,\)"),
        ({"max_norm": torch.tensor(1)}, TypeError, r"max_norm as a tensor .* dtype torch.int64"),
        ({"max_norm": torch.tensor(-0.5)}, ValueError, r"max_norm=-0\.5"),
        ({"max_norm": 1.0, "norm_type": 0}, ValueError, r"norm_type=0 is not supported: pass a float p > 0, math.inf or 'inf'"),
        ({"max_norm": 1.0, "norm_type": -2.0}, ValueError, r"norm_type=-2\.0"),
        ({"max_norm": 1.0, "norm_type": "fro"}, ValueError, r"norm_type='fro'"),
        ({"max_norm": 1.0, "norm_type": -math.inf}, ValueError, r"norm_type=-inf"),
        ({"max_norm": 1.0, "norm_type": None}, TypeError, r"norm_type must be .* got NoneType None"),
        ({"max_norm": 1.0, "error_if_nonfinite": 1}, TypeError, r"error_if_nonfinite must be a bool, got int 1"),
        ({"max_norm": 1.0, "inner": "eager"}, ValueError, r"inner='eager' is not supported: choose one of \('inductor', 'aot_eager'\)"),
        ({"max_norm": 1.0, "fuse": "yes"}, TypeError, r"fuse must be a bool, got str 'yes'"),
        ({}, ValueError, r"max_norm=None and clip_value=None: give max_norm .*, clip_value .* or both"),
        ({"clip_value": -1.0}, ValueError, r"clip_value=-1\.0 is not allowed: it must be a finite number > 0"),
        ({"clip_value": 0.0}, ValueError, r"clip_value=0\.0"),
        ({"clip_value": math.inf}, ValueError, r"clip_value=inf"),
        ({"clip_value": math.nan}, ValueError, r"clip_value=nan"),
        ({"clip_value": "1"}, TypeError, r"clip_value must be a float > 0 or None, got str '1'"),
        ({"max_norm": 1.0, "skip_nonfinite": 1}, TypeError, r"skip_nonfinite must be a bool, got int 1"),
        ({"max_norm": 1.0, "skip_nonfinite": True, "error_if_nonfinite": True}, ValueError, r"choose one"),
        ({"clip_value": 1.0, "error_if_nonfinite": True}, ValueError, r"error_if_nonfinite=True needs max_norm"),
        ({"max_norm": 1.0, "skip_nonfinite": True, "fuse": False}, ValueError, r"skip_nonfinite=True needs fuse=True"),
        ({"max_norm": 1.0, "history": 0}, ValueError, r"history=0 is not allowed: give an int >= 1"),
        ({"max_norm": 1.0, "history": 2.5}, ValueError, r"history=2\.5"),
        ({"max_norm": 1.0, "history": True}, ValueError, r"history=True"),
        ({"max_norm": 1.0, "per_param_norms": "yes"}, TypeError, r"per_param_norms must be a bool, got str 'yes'"),
        ({"max_norm": Percentile}, TypeError, r"max_norm=Percentile is the policy's class: pass an instance"),
    ],
)
def test_bad_configuration(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        clip_backend(**kwargs)


@pytest.mark.parametrize("norm_type,expected", [(2, 2.0), (0.5, 0.5), ("inf", math.inf), ("INF", math.inf), (math.inf, math.inf)])
def test_norm_type_accepted(norm_type, expected):
    assert clip_backend(max_norm=1.0, norm_type=norm_type).config.norm_type == expected


def test_config_is_frozen_and_keyword_only():
    config = ClipConfig(max_norm=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_norm = 2.0
    with pytest.raises(TypeError):
        ClipConfig(1.0)


def test_max_norm_tensor_kept_by_reference():
    t = torch.tensor(0.5)
    assert clip_backend(max_norm=t).max_norm is t


def test_total_norm_before_any_step():
    with pytest.raises(RuntimeError, match="no optimizer step has been clipped yet"):
        clip_backend(max_norm=1.0).total_norm


@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda: Percentile(q=0.0), ValueError, r"Percentile\(q=0\.0\) is not allowed: it must lie in \(0\.0, 1\.0\]"),
        (lambda: Percentile(q=1.5), ValueError, r"Percentile\(q=1\.5\)"),
        (lambda: Percentile(q=math.nan), ValueError, r"Percentile\(q=nan\)"),
        (lambda: Percentile(q="0.9"), TypeError, r"Percentile\(q=...\) must be a number, got str '0\.9'"),
        (lambda: Percentile(window=0), ValueError, r"Percentile\(window=0\) is not allowed: it must be an int >= 1"),
        (lambda: Percentile(warmup=-1), ValueError, r"Percentile\(warmup=-1\)"),
        (lambda: Percentile(warmup_max_norm=-1.0), ValueError, r"Percentile\(warmup_max_norm=-1\.0\)"),
        (lambda: ZScore(z=0.0), ValueError, r"ZScore\(z=0\.0\)"),
        (lambda: ZScore(alpha=1.0), ValueError, r"ZScore\(alpha=1\.0\) is not allowed: it must lie in \[0\.0, 1\.0\)"),
        (lambda: ZScore(warmup=0), ValueError, r"ZScore\(warmup=0\) is not allowed: it must be an int >= 1"),
        (lambda: ZScore(max_norm=math.nan), ValueError, r"ZScore\(max_norm=nan\)"),
        (lambda: AGC(clipping=0.0), ValueError, r"AGC\(clipping=0\.0\)"),
        (lambda: AGC(eps=-1e-3), ValueError, r"AGC\(eps=-0\.001\)"),
        (lambda: Percentile(0.9), TypeError, r"positional"),
    ],
)
def test_bad_policy(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_policies_are_frozen_and_accepted_as_max_norm():
    for policy in (Percentile(), ZScore(max_norm=2.0), AGC()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            policy.eps = 1.0  # every policy has a field; frozen before any name check
        assert clip_backend(max_norm=policy).max_norm is policy


def test_monitoring_reads_before_any_step():
    clip = clip_backend(max_norm=1.0)
    with pytest.raises(RuntimeError, match=r"keeps no history: pass clip_backend\(\.\.\., history=N\)"):
        clip.history
    with pytest.raises(RuntimeError, match=r"per-parameter norms are off"):
        clip.named_norms(torch.nn.Linear(2, 2))
    clip = clip_backend(max_norm=1.0, history=4, per_param_norms=True)
    assert clip.history.numel() == 0
    with pytest.raises(RuntimeError, match="no finite norm in the history yet"):
        clip.suggest_max_norm()
    with pytest.raises(ValueError, match=r"q=1\.5 is not allowed"):
        clip.suggest_max_norm(1.5)
    with pytest.raises(RuntimeError, match="no optimizer step has been clipped yet"):
        clip.param_norms
