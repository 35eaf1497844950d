"""Graph rewrites used by compileclip, as plain functions on ``torch.fx.GraphModule``.

They know nothing of ``torch.compile``'s plumbing; ``compileclip.backend`` decides when each
runs. In the order they run on a partitioned backward graph:

1. ``grad_norm.insert_grad_norm``: the float32 total norm of the selected gradient outputs,
   as an extra output (the gradients are left alone; the clip happens at the step).

On a Dynamo graph of a compiled optimizer step (before AOTAutograd):

- ``clip_step.insert_step_clip``: total norm of the gradient placeholders, every use of a
  gradient replaced by the scaled gradient, optional write-back into ``.grad``, the norm as
  an extra output.

Both passes also take the pieces of issue 10: ``norm_op.total_norm_parts`` (each gradient's
norm from the same call), ``thresholds`` (an adaptive policy's threshold as the operator
``compileclip::threshold``, the same function the eager clip calls) and ``agc`` (AGC's
unit-wise factor against the parameter, in the step graph).

On the aten-level inference graph AOTAutograd makes of that step graph:

- ``guard_step.guard_input_mutations``: every write into an input (parameters, optimizer
  state) kept only where a device-side flag says so, for skipping nonfinite steps.
"""

from .grad_norm import NormInsertion, insert_grad_norm
from .clip_step import StepClipInsertion, grad_placeholders, insert_step_clip
from .guard_step import guard_input_mutations

__all__ = [
    "NormInsertion",
    "StepClipInsertion",
    "grad_placeholders",
    "guard_input_mutations",
    "insert_grad_norm",
    "insert_step_clip",
]
