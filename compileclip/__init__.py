"""compileclip: gradient clipping fused into torch.compile's backward graphs."""

from .backend import ClipBackend, clip_backend
from .config import ClipConfig
from .policies import AGC, Percentile, ZScore
from .registry import clip_of

__all__ = ["AGC", "ClipBackend", "ClipConfig", "Percentile", "ZScore", "clip_backend", "clip_of"]
__version__ = "0.1.0"
