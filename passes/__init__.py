"""Graph rewrites used by compileclip, as plain functions on ``torch.fx.GraphModule``.

They know nothing of ``torch.compile``'s plumbing, and no arithmetic of the clip: the caller
hands in the function to trace (``compileclip.clipmath``), and each pass returns the
``GraphSignature`` it gave the graph (the inputs and outputs it added, by name).

- On a partitioned backward graph: ``grad_norm.insert_grad_norm`` appends a computation over
  the gradient outputs (the norm of each gradient) as extra outputs.
- On a Dynamo graph of a compiled optimizer step (before AOTAutograd): ``clip_step.insert_step_clip``
  traces the clip over the gradient placeholders, replaces every use of a gradient by its
  clipped value, writes it back into ``.grad`` and appends the norm (and what else the clip
  returns) as outputs.
- On the aten-level inference graph AOTAutograd makes of that step graph:
  ``guard_step.guard_input_mutations`` keeps every write into an input (parameters, optimizer
  state) only where a device-side flag says so, for skipping nonfinite steps.

``tracing.trace_into`` is the one builder they share.
"""

from .clip_step import copy_graph, grad_placeholders, insert_step_clip, param_nodes
from .grad_norm import insert_grad_norm, output_values
from .guard_step import guard_input_mutations
from .signature import GraphSignature
from .tracing import trace_into

__all__ = [
    "GraphSignature",
    "copy_graph",
    "grad_placeholders",
    "guard_input_mutations",
    "insert_grad_norm",
    "insert_step_clip",
    "output_values",
    "param_nodes",
    "trace_into",
]
