"""Graph rewrites used by compileclip, as plain functions on ``torch.fx.GraphModule``.

They know nothing of ``torch.compile``'s plumbing; ``compileclip.backend`` decides when each
runs. In the order they run on a partitioned backward graph:

1. ``clip_norm.insert_grad_norm_clip``: total norm of the selected gradient outputs, the clip
   coefficient, and the scaled gradients, with the norm as an extra output.
"""

from .clip_norm import ClipInsertion, insert_grad_norm_clip

__all__ = ["ClipInsertion", "insert_grad_norm_clip"]
