"""Identity and version checks over many gradients, batched.

The records of the backward graphs (``records.BackwardRun``) are checked at the steps that use
them: is each ``.grad`` still the tensor the graph returned, with an unchanged version counter? The checks
here are comprehensions and ``map`` calls over C functions, a handful per gradient and step;
what they cost is mostly torch's own attribute access (``.grad``, ``._version``: about 0.1 us
each on the development CPU). ``bench/record_overhead.py`` measures them.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Iterable, Sequence

import torch

_grad_of = operator.attrgetter("grad")
_storage_of = torch.Tensor.untyped_storage
_data_ptr_of = torch.Tensor.data_ptr
_version_of = operator.attrgetter("_version")


def has_none(xs: Sequence) -> bool:
    return any(map(operator.is_, xs, itertools.repeat(None)))


def deref(refs: Sequence[weakref.ref]) -> list:
    return [r() for r in refs]


def weak(objs: Sequence) -> tuple[weakref.ref, ...]:
    return tuple(map(weakref.ref, objs))


def ids(objs: Iterable) -> frozenset[int]:
    return frozenset(map(id, objs))


def grads(params: Sequence[torch.Tensor]) -> list:
    return list(map(_grad_of, params))


def storages(tensors: Sequence[torch.Tensor]) -> list:
    return list(map(_storage_of, tensors))


def data_ptrs(tensors: Sequence[torch.Tensor]) -> list[int]:
    return list(map(_data_ptr_of, tensors))


def tags(tensors: Sequence[torch.Tensor]) -> list[tuple[weakref.ref, int]]:
    """(weak reference, version) of each tensor: which tensor it is (no other can pass for it,
    as one at a reused address could) and whether it was written since."""
    return list(zip(map(weakref.ref, tensors), map(_version_of, tensors)))


def tagged(tags: Sequence, tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Per tensor: ``tags`` has its entry (``tags(...)``, or None for none), unwritten since."""
    return [t is not None and t[0]() is x and t[1] == x._version for t, x in zip(tags, tensors)]


def versions(tensors: Sequence[torch.Tensor]) -> list[int]:
    return list(map(_version_of, tensors))


def step_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters of ``opt`` that have a ``.grad``, in order."""
    return with_grad(list(itertools.chain.from_iterable(g["params"] for g in opt.param_groups)))


def with_grads(params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Those of ``params`` that have a ``.grad``, in order, and those gradients (one pass)."""
    params = list(params)
    gs = grads(params)
    if not has_none(gs):
        return params, gs
    keep = list(map(operator.is_not, gs, itertools.repeat(None)))
    return list(itertools.compress(params, keep)), list(itertools.compress(gs, keep))


def with_grad(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Those of ``params`` that have a ``.grad``, in order."""
    params = list(params)
    gs = grads(params)
    if not has_none(gs):
        return params
    return list(itertools.compress(params, map(operator.is_not, gs, itertools.repeat(None))))
