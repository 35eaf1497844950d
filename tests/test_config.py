"""Bad configuration raises at construction, naming the argument, the value and what is
allowed, before anything is compiled."""

import dataclasses
import math

import pytest
import torch

from compileclip import ClipConfig, clip_backend


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"max_norm": -1.0}, ValueError, r"max_norm=-1\.0 .* >= 0"),
        ({"max_norm": math.nan}, ValueError, r"max_norm=nan .* >= 0"),
        ({"max_norm": "1.0"}, TypeError, r"max_norm must be a float >= 0 .* got str '1\.0'"),
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
