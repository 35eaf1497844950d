"""compileclip: gradient clipping fused into torch.compile's backward graphs."""

from .backend import ClipBackend, clip_backend
from .config import ClipConfig

__all__ = ["ClipBackend", "ClipConfig", "clip_backend"]
__version__ = "0.1.0"
