"""DDP: the norm of each averaged gradient, taken where the reducer produces it.

Under DistributedDataParallel a backward graph sees the local gradients, before the all-reduce
averages them, so its norms are no use to the step. Instead the clip registers a communication
hook on the DDP module it compiles (``install``): each bucket is averaged as DDP's own reducer
averages it, and when its all-reduce completes, the norm of every gradient in it is taken from
the bucket (one ``_foreach_norm`` per bucket, on the autograd thread). At the end of
the backward, after DDP has written the buckets back to ``.grad``, those norms become
``records.BackwardRun``\\ s with ``collective=True``: a step uses them where ``.grad`` is still the
tensor it was then, with the same version counter, and norms the rest itself.

Exact: DDP's reducer multiplies each gradient by ``1 / world_size`` while copying it into the
bucket, or divides a gradient that is a view of the bucket by ``world_size``; for a power-of-two
world size both equal the hook's ``mul_(1 / world_size)`` bit for bit, so the clip installs its
hook only there (elsewhere the step norms, as without DDP's hook). A user's own hook composes
through ``clip.comm_hook(hook)``: the norms are taken from whatever the user's hook returns.

The end of the backward: a callback queued on the autograd engine from the hook queues a second
callback, which runs after every callback queued during the backward, DDP's
``finalize_backward`` among them (the engine runs callbacks queued by callbacks, in order).
"""

from __future__ import annotations

import weakref

import torch

from . import clipmath, hooks, identity
from .records import BackwardRun

_installed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DDP module -> its _NormHook


def active_ddp():
    """The DistributedDataParallel module whose forward Dynamo is compiling, or None."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # a build without distributed
        return None
    get = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return get() if get is not None else None


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def install(rt, ddp) -> bool:
    """Register the clip's hook on ``ddp`` where it is exact and nothing else holds the place.
    Returns whether ``ddp``'s reduced gradients get their norms from a hook of ``rt``."""
    hook = _installed.get(ddp)
    if hook is not None:
        if hook.runtime() is None:  # its clip is gone (a sweep's earlier run): this one takes it
            hook.runtime = weakref.ref(rt)
        return hook.runtime() is rt
    if ddp._comm_hooks:  # a user's hook: composed if it came through clip.comm_hook
        return any(isinstance(h, _NormHook) and h.runtime() is rt for h, _ in ddp._comm_hooks)
    if getattr(ddp, "mixed_precision", None) is not None:
        return False  # DDP's own mixed precision reduces copies of the gradients
    if not _power_of_two(torch.distributed.get_world_size(ddp.process_group)):
        return False
    hook = _NormHook(rt, None)
    try:
        ddp.register_comm_hook(ddp.process_group, hook)
    except (RuntimeError, ValueError, TypeError, AttributeError) as e:
        # a builtin hook registered already (one hook per reducer), or a DDP that checks more
        rt.warn_once("ddp_hook", f"could not register its DDP communication hook ({e}); the step "
                     "norms the gradients instead")
        return False
    _installed[ddp] = hook
    rt.stats["ddp_hook"] += 1
    return True


def _allreduce_mean(process_group, bucket):
    """DDP's default reduction: the mean over ranks (for a power-of-two world size, bitwise)."""
    buf = bucket.buffer()
    buf.mul_(1.0 / torch.distributed.get_world_size(process_group))
    fut = torch.distributed.all_reduce(buf, group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class _NormHook:
    """A DDP communication hook: ``inner`` (DDP's default mean when None), then the norm of each
    gradient of the bucket from its result. Holds the clip's runtime weakly."""

    def __init__(self, rt, inner) -> None:
        self.runtime = weakref.ref(rt)
        self.inner = inner
        # DDP checks and logs these
        self.__name__ = self.__qualname__ = f"compileclip_norms({getattr(inner, '__qualname__', 'allreduce')})"
        self._pending: list = []  # (norms, parameter refs) of this backward
        self._waiting: list = []  # (future, gradient shapes, parameter refs): reduction in flight
        self._task = None

    def __call__(self, state, bucket):
        fut = _allreduce_mean(state, bucket) if self.inner is None else self.inner(state, bucket)
        rt = self.runtime()
        if rt is None or not self._begin(rt):
            return fut
        self._norm_reduced(rt, last=False)  # earlier buckets whose reduction is complete
        self._waiting.append((fut, [g.shape for g in bucket.gradients()], identity.weak(bucket.parameters())))
        return fut

    def _norm_reduced(self, rt, last: bool) -> None:
        """The norms of the reduced buckets, taken here, on the autograd thread (not in a
        callback on the communication thread, where each op waits for the GIL: 15 ms a step
        with gloo, measured): as the backward goes on for the buckets whose reduction has
        completed, and at the end for the rest. ``wait()`` on a completed future does not
        block (for a CUDA future it orders the current stream after the collective)."""
        waiting, self._waiting = self._waiting, []
        inv = None
        for fut, shapes, refs in waiting:
            if not last and not fut.done():
                self._waiting.append((fut, shapes, refs))
                continue
            out = fut.wait()
            out = out if isinstance(out, torch.Tensor) else out[0]
            if out.numel() != sum(s.numel() for s in shapes):  # not the bucket: the step norms
                continue
            if rt.scaler is not None and inv is None:
                inv = clipmath.inverse_scale(rt.scale_on(out.device))
            self._pending.append((clipmath.grad_norms(_views(out, shapes), rt.config.norm_type, inv), refs))

    def _begin(self, rt) -> bool:
        """Whether the norms can be confirmed: False outside a backward (DDP's Join runs the
        hook on zeros for a rank that ran out of data)."""
        task = torch._C._current_graph_task_id()
        if task == self._task:
            return True
        if task < 0:
            return False
        self._task = task
        self._pending, self._waiting = [], []
        rt.new_backward()
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(lambda: engine.queue_callback(self._confirm))
        return True

    def _confirm(self) -> None:
        """After DDP's finalize_backward: the norms with the ``.grad`` tensors they are of."""
        rt = self.runtime()
        if rt is not None:
            self._norm_reduced(rt, last=True)
        pending, self._pending, self._waiting, self._task = self._pending, [], [], None
        if rt is None:
            return
        for norms, refs in pending:
            params = identity.deref(refs)
            grads = [None if p is None else p.grad for p in params]
            keep = [g is not None for g in grads]
            if not any(keep):
                continue
            if not all(keep):  # unused parameters (find_unused_parameters) get no .grad
                norms = norms[torch.tensor([i for i, k in enumerate(keep) if k], device=norms.device)]
                refs = tuple(r for r, k in zip(refs, keep) if k)
                grads = [g for g in grads if g is not None]
            rt.add_run(BackwardRun((norms,), refs, tuple(grads), tuple(identity.versions(grads)), hooks.steps(),
                                   collective=True))


def _views(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """The bucket's gradients as views of a flat result, in the bucket's order (DDP packs them
    back to back)."""
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat.narrow(0, offset, n).view(shape))
        offset += n
    return out


def comm_hook(rt, hook=None):
    """A DDP communication hook that runs ``hook`` (DDP's default mean when None) and takes the
    norm of each reduced gradient for the clip."""
    return _NormHook(rt, hook)
