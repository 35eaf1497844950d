"""The one eager-comparison harness: a training loop run with the clip and with an eager
reference, compared step by step.

A *loop* is a function ``run(models, opts, clip, steps, i)`` that does iteration ``i``: forward,
backward, and ``steps[k]()`` wherever the loop would call ``opts[k].step()``. The harness builds
two copies of the same initial models:

- compiled: the models compiled with ``clip_backend`` by a *setup* (below), and ``steps[k]`` =
  ``opts[k].step`` (or a step made by ``clip.compile_step``). ``clip`` is the first step's clip.
- eager: a deep copy, run as it is (or through plain ``torch.compile``: ``reference_compile``,
  the control that cancels Inductor's own rounding), and ``steps[k]`` = the *reference* clip over
  the optimizer's parameters with a ``.grad``, then ``opts[k].step()``. ``clip`` is None.

The reference is pluggable: any object with ``clip_(params)`` returning the pre-clip total norm
(or ``(total, threshold)``): ``EagerClip`` (``clip_grad_norm_``, the default), or the policies
of ``reference_clip.py``. Loops where eager clips elsewhere than right before each step (a
group of two optimizers clipped once, a closure, a GradScaler) branch on ``clip is None`` and
call ``steps[k].clip_grads(params)`` (eager only) and ``steps[k].raw(...)`` (the step without
the reference clip) themselves.

The eager copy trains first, before any clip object exists; then the compiled copy, on the same
fresh random data (the global seed is set before each iteration). Then, iteration by iteration,
for every optimizer step: the ``.grad`` it left (eager leaves the clipped gradients there: what
the step consumed) and the pre-clip total norm; then every parameter of every model. With
``torch.testing.assert_close`` at its default tolerances, ``tol="bitwise"`` for
``torch.equal``, or given tolerances (only where the plain control differs as much). It also
asserts that the clip really was active (eager's norm above ``max_norm``) or inactive.
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

ACTIVE = 1e-2  # every model here has a pre-clip gradient norm well above this
INACTIVE = 1e6  # ... and well below this

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


def new_clip(**kwargs):
    """``clip_backend(**kwargs)``, watched by ``isolated``."""
    clip = clip_backend(**kwargs)
    _clips_made.append(weakref.ref(clip))
    return clip


class EagerClip:
    """The default reference: ``clip_grad_norm_(params, max_norm, norm_type)``."""

    def __init__(self, max_norm: float, norm_type: float = 2.0, **kwargs):
        self.max_norm, self.norm_type, self.kwargs = max_norm, norm_type, kwargs

    def clip_(self, params) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_norm,
                                              self.norm_type, **self.kwargs)


class Step:
    """What a loop calls instead of ``opt.step()``. Records, after each step, a copy of the
    ``.grad`` of every parameter of the optimizer and the pre-clip total norm."""

    def __init__(self, opt: torch.optim.Optimizer, clip=None, fn: Callable | None = None, reference=None):
        self.opt, self.clip, self.fn, self.reference = opt, clip, fn, reference
        self.records: list[tuple[list, torch.Tensor | None]] = []

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.opt.param_groups for p in group["params"]]

    def clip_grads(self, params=None) -> None:
        """Eager only: the reference clip over ``params`` (default: this optimizer's)."""
        assert self.clip is None, "clip_grads() is the eager reference's clip"
        out = self.reference.clip_([p for p in (self.params() if params is None else params) if p.grad is not None])
        self.reference.last_norm = out[0] if isinstance(out, tuple) else out  # shared by a group's steps

    def __call__(self, *args, **kwargs):
        if self.clip is None:
            self.clip_grads()
        return self.raw(*args, **kwargs)

    def raw(self, *args, **kwargs):
        """The step itself (no reference clip), then record."""
        # a closure makes its gradients inside the step: nothing to hold them against
        closure = bool(args) or "closure" in kwargs
        before = None if self.clip is not None or closure else [None if p.grad is None else p.grad.clone() for p in self.params()]
        out = (self.fn or self.opt.step)(*args, **kwargs)  # an LR scheduler wraps opt.step
        self.record(before)
        return out

    def record(self, before=None) -> None:
        grads = [None if p.grad is None else p.grad.clone() for p in self.params()]
        if self.clip is None:
            for k, (g, b) in enumerate(zip(grads, before or grads)):
                # SGD/Adam(W) do not write .grad: a change means a global optimizer hook of the
                # library touched an optimizer it does not own
                assert (g is None) == (b is None) and (g is None or g.equal(b) or bool(((g == b) | (g.isnan() & b.isnan())).all())), (
                    f"the .grad of parameter {k} of an eager optimizer changed during its step: a "
                    "global optimizer hook of compileclip clipped it?")
            norm = getattr(self.reference, "last_norm", None)
        else:
            norm = self.clip.total_norm.clone() if self.clip.config.computes_norm else None
        self.records.append((grads, norm))


@dataclass(repr=False)
class Side:
    models: list  # what is compared: modules, or anything with named_parameters()
    run_models: list  # what the loop calls: compiled wrappers, or the models themselves
    opts: list[torch.optim.Optimizer]
    steps: list[Step]

    @property
    def clip(self):
        return self.steps[0].clip


# -- setups: how the compiled copy gets its clip ---------------------------------------------------
# setup(models, opts, new_clip) -> (run_models, steps); new_clip() makes a fresh clip_backend


def whole_model(**compile_kwargs):
    """One clip object; ``torch.compile(m, backend=clip)`` for every model; eager steps."""
    def setup(models, opts, make):
        clip = make()
        return [torch.compile(m, backend=clip, **compile_kwargs) for m in models], [Step(o, clip) for o in opts]
    return setup


def per_model_clips(models, opts, make):
    """A clip object per model: model k compiled with clip k, which opts[k] steps."""
    clips = [make() for _ in models]
    return [torch.compile(m, backend=c) for m, c in zip(models, clips)], [Step(o, c) for o, c in zip(opts, clips)]


def per_model_clips_steps(models, opts, make):
    """``per_model_clips``, each optimizer's step through its clip's ``compile_step``: with two
    clips alive, every post-hook looks at both clips' open steps."""
    clips = [make() for _ in models]
    return ([torch.compile(m, backend=c) for m, c in zip(models, clips)],
            [Step(o, c, fn=c.compile_step(o)) for o, c in zip(opts, clips)])


def regional(models, opts, make):
    """Regional compilation: ``blk.compile(backend=clip)`` for each of ``model.blocks``."""
    clip = make()
    for model in models:
        for blk in model.blocks:
            blk.compile(backend=clip)
    return models, [Step(o, clip) for o in opts]


def step_compiled(compile_model: bool, direct: bool = False, **compile_kwargs):
    """``step = clip.compile_step(opt)`` (``direct``: ``torch.compile(opt.step, backend=clip)``);
    the models compiled with the same clip, or eager."""
    def setup(models, opts, make):
        clip = make()
        run_models = [torch.compile(m, backend=clip, **compile_kwargs) for m in models] if compile_model else models
        steps = [Step(o, clip, fn=torch.compile(o.step, backend=clip) if direct else clip.compile_step(o)) for o in opts]
        return run_models, steps
    return setup


def group_loop(batch: Callable, step_args: tuple = ()):
    """A loop of one model stepped by several optimizers (one group): one backward, then each
    optimizer's ``step(*step_args)``; eager clips the group once, before the first step."""
    def loop(models, opts, clip, steps, i):
        (model,) = models
        x, y = batch()
        for o in opts:
            o.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if clip is None:
            steps[0].clip_grads([p for o in opts for g in o.param_groups for p in g["params"]])
        for s in steps:
            s.raw(*step_args)
    return loop


# -- the harness ---------------------------------------------------------------------------------


def compiled_side(models, opts, setup=whole_model(), **clip_kwargs) -> Side:
    run_models, steps = setup(models, opts, lambda: new_clip(**clip_kwargs))
    return Side(models, run_models, opts, steps)


def eager_side(models, opts, reference, compile_kwargs: dict | None = None) -> Side:
    run_models = [torch.compile(m, **compile_kwargs) for m in models] if compile_kwargs is not None else models
    return Side(models, run_models, opts, [Step(o, reference=reference) for o in opts])


def optimizer_state(opt: torch.optim.Optimizer) -> list[dict]:
    """A copy of the optimizer's state, per parameter in order (tensors only)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return [{k: v.detach().clone() for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
            for p in params]


def train(run, side: Side, iterations) -> list:
    """Run the loop on one side. Per iteration: each optimizer's step records, a copy of every
    model's named parameters, and of every optimizer's state."""
    trace = []
    for i in iterations:
        seen = [len(s.records) for s in side.steps]
        torch.manual_seed(1000 + i)  # the same fresh data on both sides
        run(side.run_models, side.opts, side.clip, side.steps, i)
        trace.append(([s.records[n:] for s, n in zip(side.steps, seen)],
                      [[(name, p.detach().clone()) for name, p in m.named_parameters()] for m in side.models],
                      [optimizer_state(o) for o in side.opts]))
    return trace


def assert_clip_state(ref_norm: torch.Tensor, max_norm: float) -> None:
    """Keep the tests honest: 'active' must really scale, 'inactive' must not."""
    if ref_norm is not None and bool(torch.isfinite(ref_norm)) and max_norm in (ACTIVE, INACTIVE):
        assert (float(ref_norm) > max_norm) == (max_norm == ACTIVE), (float(ref_norm), max_norm)


def _close(a, b, tol, msg, coef: float = 1.0) -> None:
    """``coef``: the eager clip's coefficient of this step. With the default tolerances the
    absolute one shrinks with it: clipped gradients are small, and assert_close's 1e-5 would
    hide a 1% error in the coefficient at max_norm 1e-2. Inductor's rounding scales with the
    gradients, so the clipped ones keep the room the unclipped ones have."""
    if tol == "bitwise":
        assert a.dtype == b.dtype and torch.equal(a, b), msg(f"not bitwise equal: max diff {float((a - b).abs().max())}")
        return
    if tol is None and coef < 1.0 and b.dtype == torch.float32:
        tol = {"rtol": 1.3e-6, "atol": 1e-5 * coef}
    torch.testing.assert_close(a, b, **(tol or {}), msg=msg)


def _coef(ref_norm, max_norm) -> float:
    """Eager's clip coefficient, where a plain number ``max_norm`` clipped a finite norm."""
    if not isinstance(max_norm, float) or ref_norm is None or not bool(torch.isfinite(ref_norm)):
        return 1.0
    return min(1.0, max_norm / (float(ref_norm) + 1e-6))


def compare(trace: list, ref_trace: list, max_norm: float | None, tol=None) -> None:
    """Assert a compiled trace against the eager one, iteration by iteration: per optimizer step
    the total norm and the .grad it left, then the parameters. ``tol``: None (assert_close's
    defaults), "bitwise", or rtol/atol (only where plain torch.compile differs as much)."""
    assert len(trace) == len(ref_trace)
    for i, ((records, params, states), (ref_records, ref_params, ref_states)) in enumerate(zip(trace, ref_trace)):
        for k, (new, ref) in enumerate(zip(records, ref_records)):
            assert len(new) == len(ref), f"iteration {i}: optimizer {k} stepped {len(new)} times, eager {len(ref)}"
            for j, ((grads, norm), (ref_grads, ref_norm)) in enumerate(zip(new, ref)):
                what = f"iteration {i}, optimizer {k}, step {j}"
                assert_clip_state(ref_norm, max_norm)
                assert (norm is None) == (ref_norm is None), what
                if norm is not None:
                    # float32 where eager's is bf16/fp16 (accumulated in float32); float64 as eager's
                    dtype = torch.float64 if ref_norm.dtype == torch.float64 else torch.float32
                    assert norm.dtype == dtype and norm.dim() == 0, (what, norm)
                    _close(norm, ref_norm.to(dtype), tol, lambda m: f"{what}: total norm: {m}")
                for n, (g, rg) in enumerate(zip(grads, ref_grads)):
                    assert (g is None) == (rg is None), f"{what}: .grad of param {n} is None on one side only"
                    if g is not None:
                        _close(g, rg, tol, lambda m: f"{what}: .grad of param {n}: {m}", _coef(ref_norm, max_norm))
        for m, (named, ref_named) in enumerate(zip(params, ref_params)):
            for (name, p), (_, q) in zip(named, ref_named):
                _close(p, q, tol, lambda msg: f"iteration {i}: model {m} param {name}: {msg}")
        for k, (state, ref_state) in enumerate(zip(states, ref_states)):
            for n, (st, rst) in enumerate(zip(state, ref_state)):
                assert st.keys() == rst.keys(), f"iteration {i}: optimizer {k} state of param {n}: {st.keys()} vs {rst.keys()}"
                for key in st:
                    _close(st[key], rst[key], tol, lambda msg: f"iteration {i}: optimizer {k} state[{n}][{key!r}]: {msg}")
    for k in range(len(ref_trace[0][0])):
        assert any(records[k] for records, *_ in ref_trace), f"optimizer {k} never stepped"


def compare_with_eager(run, make_models, make_opts, setup=whole_model(), *, max_norm, iterations: int = 3,
                       norm_type: float = 2.0, seed: int = 0, tol=None, reference=None,
                       reference_compile: dict | None = None, **clip_kwargs) -> Side:
    """Train the eager copy, then the compiled copy (so that no clip object exists while the
    eager reference trains), ``iterations`` times each; compare. Returns the compiled side.
    ``reference``: the eager clip (default ``EagerClip(max_norm, norm_type)``);
    ``reference_compile``: run the eager copy through plain ``torch.compile(**kwargs)``."""
    torch.manual_seed(seed)
    models = list(make_models())
    refs = copy.deepcopy(models)
    reference = reference or EagerClip(max_norm, norm_type)
    ref_trace = train(run, eager_side(refs, make_opts(refs), reference, reference_compile), range(iterations))
    compiled = compiled_side(models, make_opts(models), setup, max_norm=max_norm, norm_type=norm_type, **clip_kwargs)
    compare(train(run, compiled, range(iterations)), ref_trace, max_norm if not isinstance(max_norm, torch.Tensor) else None, tol)
    return compiled


def _reporting(fn, args):
    try:
        return True, fn(*args)
    except BaseException:  # pytest's outcomes do not pickle: send the traceback as text
        import traceback

        return False, traceback.format_exc()


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process (for what leaves state behind in this one);
    returns its result, or fails here with the child's traceback. ``fn`` must be importable."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        ok, out = pool.apply(_reporting, (fn, args))
    if not ok:
        pytest.fail(f"in a fresh process:\n{out}", pytrace=False)
    return out


def stats(clip) -> dict:
    """The clip's counters that are not zero."""
    return {k: v for k, v in clip.stats.items() if v}


def per_opt(factory: Callable):
    """State a loop keeps per copy (a GradScaler, an LR scheduler), made on first use and keyed
    by the copy's (first) optimizer."""
    made: dict = {}

    def get(opt):
        if opt not in made:
            made[opt] = factory(opt)
        return made[opt]
    return get


class Leaves:
    """Plain tensors that require grad, named: the "model" of a functional forward."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(self):
        return list(self.tensors.items())

    def parameters(self):
        return list(self.tensors.values())

    def __deepcopy__(self, memo):
        return Leaves({k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in self.tensors.items()})


def mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, 4))
