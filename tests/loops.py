"""One harness for whole training loops against eager ``clip_grad_norm_``.

A *loop* is a function ``run(models, opts, clip, steps, i)`` that does iteration ``i`` of a
training loop: forward, backward, and ``steps[k]()`` wherever the loop would call
``opts[k].step()``. The harness builds two copies of the same initial models:

- compiled: the models compiled with ``clip_backend`` (by a *setup*, below), and
  ``steps[k]`` = ``opts[k].step`` (or a step made by ``clip.compile_step``). ``clip`` is the
  clip object of the first optimizer.
- eager: a deep copy of the initial models, run as they are, and ``steps[k]`` =
  ``clip_grad_norm_(params of opts[k] that have a .grad, max_norm, norm_type)`` then
  ``opts[k].step()``. ``clip`` is None.

The eager copy trains first, before any clip object exists; then the compiled copy, on the
same fresh random data (the global seed is set before each iteration). Then, iteration by
iteration, for every optimizer step taken: the ``.grad`` it left (eager leaves the clipped
gradients there) and the pre-clip total norm (``clip.total_norm`` read right after the step,
against the value ``clip_grad_norm_`` returned); then every parameter of every model. All with
``torch.testing.assert_close`` at its default tolerances. It also asserts that the clip really
was active (eager's norm above ``max_norm``) or inactive (below), and that no optimizer hook
changed the eager copy's gradients during its steps.

Loops where eager clips somewhere other than right before ``opt.step()`` (a closure, a
GradScaler) branch on ``clip is None`` and call ``steps[k].clip_grads()`` (eager only) and
``steps[k].raw(...)`` (the step without the eager clip) themselves.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from compileclip import clip_backend
from helpers import ACTIVE, INACTIVE, assert_clip_state

__all__ = ["ACTIVE", "INACTIVE", "Side", "Step", "compare", "compare_with_eager", "compiled_side",
           "eager_side", "in_fresh_process", "isolated", "per_model_clips", "per_opt", "regional",
           "step_compiled", "train", "whole_model"]


_clips_made: list[weakref.ref] = []  # every clip the harness made, weakly


@pytest.fixture(autouse=True)
def isolated():
    """Import into a test module. A clip object hears every optimizer step of the process while
    it lives: one left alive by a test would act in the tests after it. So, after each test,
    fail it if a clip it made is still alive once torch._dynamo.reset() and gc.collect() ran."""
    yield
    sys.last_type = sys.last_value = sys.last_traceback = None  # a failed test's frames
    if hasattr(sys, "last_exc"):
        sys.last_exc = None
    torch._dynamo.reset()  # Dynamo's caches hold the backends they compiled with
    gc.collect()
    alive = sum(ref() is not None for ref in _clips_made)
    _clips_made.clear()
    if alive:
        pytest.fail(f"{alive} clip object(s) made by this test are still alive after torch._dynamo.reset() "
                    "and gc.collect(): they would hear every later optimizer step of this process")


class Step:
    """What a loop calls instead of ``opt.step()``. Records, after each step, a copy of the
    ``.grad`` of every parameter of the optimizer and the pre-clip total norm."""

    def __init__(self, opt: torch.optim.Optimizer, clip=None, fn: Callable | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0):
        self.opt, self.clip, self.fn = opt, clip, fn  # fn None: opt.step, looked up per call
        self.max_norm, self.norm_type = max_norm, norm_type
        self.records: list[tuple[list, torch.Tensor | None]] = []
        self._eager_norm = self._clipped = None

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.opt.param_groups for p in group["params"]]

    def clip_grads(self) -> None:
        """Eager only: ``clip_grad_norm_`` over this optimizer's parameters with a ``.grad``."""
        assert self.clip is None, "clip_grads() is the eager reference's clip"
        params = [p for p in self.params() if p.grad is not None]
        self._eager_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)
        self._clipped = [None if p.grad is None else p.grad.clone() for p in self.params()]

    def __call__(self, *args, **kwargs):
        if self.clip is None:
            self.clip_grads()
        return self.raw(*args, **kwargs)

    def raw(self, *args, **kwargs):
        """The step itself (no eager clip), then record."""
        out = (self.fn or self.opt.step)(*args, **kwargs)  # an LR scheduler wraps opt.step
        self.record()
        return out

    def record(self) -> None:
        grads = [None if p.grad is None else p.grad.clone() for p in self.params()]
        if self.clip is None:
            assert self._eager_norm is not None, "eager loop stepped without clip_grads()"
            # SGD/Adam(W) do not write .grad: what the eager clip left must still be there,
            # or a global optimizer hook of the library touched an optimizer it does not own
            for k, (g, c) in enumerate(zip(grads, self._clipped)):
                assert (g is None) == (c is None) and (g is None or torch.equal(g, c)), (
                    f"the .grad of parameter {k} of an eagerly clipped optimizer (no clip of its own) "
                    "changed during its step: a global optimizer hook of compileclip clipped it?")
            norm = self._eager_norm
        else:
            norm = self.clip.total_norm.clone()
        self._eager_norm = self._clipped = None
        self.records.append((grads, norm))


@dataclass(repr=False)
class Side:
    models: list[nn.Module]  # the modules built (their parameters are compared)
    run_models: list  # what the loop calls: compiled wrappers, or the modules themselves
    opts: list[torch.optim.Optimizer]
    steps: list[Step]

    @property
    def clip(self):
        return self.steps[0].clip


# -- setups: how the compiled copy gets its clip -----------------------------------------------
# setup(models, opts, new_clip) -> (run_models, steps); new_clip() makes a fresh clip_backend


def whole_model(**compile_kwargs):
    """One clip object; ``torch.compile(m, backend=clip)`` for every model; eager steps."""
    def setup(models, opts, new_clip):
        clip = new_clip()
        return ([torch.compile(m, backend=clip, **compile_kwargs) for m in models],
                [Step(o, clip) for o in opts])
    return setup


def per_model_clips(models, opts, new_clip):
    """A clip object per model: model k compiled with clip k, which opts[k] steps."""
    clips = [new_clip() for _ in models]
    return ([torch.compile(m, backend=c) for m, c in zip(models, clips)],
            [Step(o, c) for o, c in zip(opts, clips)])


def regional(models, opts, new_clip):
    """Regional compilation: ``blk.compile(backend=clip)`` for each of ``model.blocks``."""
    clip = new_clip()
    for model in models:
        for blk in model.blocks:
            blk.compile(backend=clip)
    return models, [Step(o, clip) for o in opts]


def step_compiled(compile_model: bool):
    """``step = clip.compile_step(opt)``; the models compiled with the same clip, or eager."""
    def setup(models, opts, new_clip):
        clip = new_clip()
        run_models = [torch.compile(m, backend=clip) for m in models] if compile_model else models
        return run_models, [Step(o, clip, fn=clip.compile_step(o)) for o in opts]
    return setup


# -- the harness -------------------------------------------------------------------------------


def compiled_side(models, opts, setup=whole_model(), *, max_norm: float, norm_type: float = 2.0,
                  **clip_kwargs) -> Side:
    def new_clip():
        clip = clip_backend(max_norm=max_norm, norm_type=norm_type, **clip_kwargs)
        _clips_made.append(weakref.ref(clip))
        return clip

    run_models, steps = setup(models, opts, new_clip)
    return Side(models, run_models, opts, steps)


def eager_side(models, opts, *, max_norm: float, norm_type: float = 2.0) -> Side:
    return Side(models, models, opts, [Step(o, max_norm=max_norm, norm_type=norm_type) for o in opts])


def train(run, side: Side, iterations) -> list:
    """Run the loop on one side. Per iteration: each optimizer's step records, and a copy of
    every model's named parameters."""
    trace = []
    for i in iterations:
        seen = [len(s.records) for s in side.steps]
        torch.manual_seed(1000 + i)  # the same fresh data on both sides
        run(side.run_models, side.opts, side.clip, side.steps, i)
        trace.append(([s.records[n:] for s, n in zip(side.steps, seen)],
                      [[(name, p.detach().clone()) for name, p in m.named_parameters()] for m in side.models]))
    return trace


def compare(trace: list, ref_trace: list, max_norm: float, tol: dict | None = None) -> None:
    """Assert a compiled trace against the eager one, iteration by iteration: per optimizer
    step the total norm and the .grad it left, then the parameters. ``tol``: rtol/atol for
    assert_close, only where plain torch.compile (no clip) differs as much."""
    tol = tol or {}
    assert len(trace) == len(ref_trace)
    for i, ((records, params), (ref_records, ref_params)) in enumerate(zip(trace, ref_trace)):
        for k, (new, ref) in enumerate(zip(records, ref_records)):
            assert len(new) == len(ref), f"iteration {i}: optimizer {k} stepped {len(new)} times, eager {len(ref)}"
            for j, ((grads, norm), (ref_grads, ref_norm)) in enumerate(zip(new, ref)):
                what = f"iteration {i}, optimizer {k}, step {j}"
                assert_clip_state(ref_norm, max_norm)  # 'active' must clip, 'inactive' must not
                assert norm.dtype == torch.float32 and norm.dim() == 0, (what, norm)
                torch.testing.assert_close(norm, ref_norm.float(), **tol, msg=lambda m: f"{what}: total norm: {m}")
                for n, (g, rg) in enumerate(zip(grads, ref_grads)):
                    assert (g is None) == (rg is None), f"{what}: .grad of param {n} is None on one side only"
                    if g is not None:
                        torch.testing.assert_close(g, rg, **tol, msg=lambda m: f"{what}: .grad of param {n}: {m}")
        for m, (named, ref_named) in enumerate(zip(params, ref_params)):
            for (name, p), (_, q) in zip(named, ref_named):
                torch.testing.assert_close(p, q, **tol, msg=lambda msg: f"iteration {i}: model {m} param {name}: {msg}")
    for k in range(len(ref_trace[0][0])):
        assert any(records[k] for records, _ in ref_trace), f"optimizer {k} never stepped"


def compare_with_eager(run, make_models, make_opts, setup=whole_model(), *, max_norm: float,
                       iterations: int = 3, norm_type: float = 2.0, seed: int = 0, tol: dict | None = None,
                       **clip_kwargs) -> Side:
    """Train the eager copy, then the compiled copy (so that no clip object exists while the
    eager reference trains), ``iterations`` times each; compare. Returns the compiled side."""
    torch.manual_seed(seed)
    models = list(make_models())
    refs = copy.deepcopy(models)
    ref_trace = train(run, eager_side(refs, make_opts(refs), max_norm=max_norm, norm_type=norm_type), range(iterations))
    compiled = compiled_side(models, make_opts(models), setup, max_norm=max_norm, norm_type=norm_type, **clip_kwargs)
    compare(train(run, compiled, range(iterations)), ref_trace, max_norm, tol)
    assert isinstance(compiled.clip.stats, dict)
    return compiled


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process (for what leaves state behind in this one);
    returns its result, or raises its exception here. ``fn`` must be importable."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def per_opt(factory: Callable):
    """State a loop keeps per copy (a GradScaler, an LR scheduler), made on first use and
    keyed by the copy's (first) optimizer."""
    made: dict = {}

    def get(opt):
        if opt not in made:
            made[opt] = factory(opt)
        return made[opt]
    return get
