"""Where the host time of ``clip.compile_step(opt)`` goes, in microseconds per step: the
step of ``bench/step_hook_overhead.py``'s "model compiled with the clip" variant (Adam, foreach,
tiny tensors, one thread), with the clip's functions wrapped by timers (inclusive times; a
wrapper costs about 1 us itself, so read them as proportions), and the same loop with the
pre- and post-hook work replaced by the least a step that hands the backward's norm to the
graph must do (the group, its gradients, the records check, the total norm): what the rest of
the machinery costs.

    .venv/bin/python bench/step_host_parts.py [--tensors 16] [--steps 400]
"""

from __future__ import annotations

import argparse
import collections
import functools
import platform
import statistics
import time
import weakref

import torch

import compileclip
from compileclip import discover, eager, hooks, identity, records, runtime, scope, step_call
from compileclip.plan import Action, StepPlan

from step_hook_overhead import Variant

PARTS = [(runtime.ClipRuntime, n) for n in ("begin_step", "facts", "end_step", "mark_clipped", "graph_call",
                                            "graph_done")]
PARTS += [(hooks, "begin"), (hooks, "end"), (hooks, "owner_of"), (eager, "hand_norm"), (eager, "total_of"),
          (eager, "group_norms"), (runtime, "plan_step"), (scope.Scope, "group"), (discover, "complete_group"),
          (step_call.ClippedStep, "__call__"), (step_call.CompiledStep, "_call")]


def timed_parts(n: int, steps: int) -> tuple[float, dict[str, float]]:
    acc: dict[str, float] = collections.defaultdict(float)
    saved = []
    for owner, name in PARTS:
        f = getattr(owner, name)
        saved.append((owner, name, f))

        def wrapper(*a, _f=f, _label=f"{getattr(owner, '__name__', owner)}.{name}".split(".")[-2:], **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                acc[".".join(_label)] += time.perf_counter() - t
        setattr(owner, name, functools.wraps(f)(wrapper))
    try:
        clip = compileclip.clip_backend(max_norm=1e-3)
        v = Variant(n, 2, clip.compile_step, lambda m: torch.compile(m, backend=clip))
        v.block(20)
        acc.clear()
        total = v.block(steps)
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)
    return total, {k: s / steps for k, s in acc.items()}


_PLAN = StepPlan(Action.IN_GRAPH, use_backward=True, hand_norm=True)


def _least_begin(self, opt, args, kwargs, compiled_frame, scaler_called=None):
    group = self.scope.group(opt)
    params, grads = identity.with_grads(group.params)
    found = records.resolve(self.runs, params, grads)
    step = self.open = runtime.OpenStep(weakref.ref(opt), _PLAN, group, params=params, grads=grads, sources=found)
    step.handed = torch.linalg.vector_norm(found.runs[found.whole].pieces[0], 2.0)
    self.runs = []


def _least_end(self, opt):
    self.open = None


def least(n: int, steps: int, reps: int) -> tuple[list[float], list[float], list[float]]:
    """Plain compiled step, the full clip, and the clip with the least pre/post-hook work."""
    clip = compileclip.clip_backend(max_norm=1e-3)
    hooks.remove(clip)
    plain = Variant(n, 0, lambda o: torch.compile(o.step))
    plain.block(3)
    hooks.register(clip)
    full = Variant(n, 1, clip.compile_step, lambda m: torch.compile(m, backend=clip))
    full.block(5)
    clip2 = compileclip.clip_backend(max_norm=1e-3)
    bare = Variant(n, 2, clip2.compile_step, lambda m: torch.compile(m, backend=clip2))
    bare.block(5)
    out: tuple[list[float], list[float], list[float]] = ([], [], [])
    begin, end = runtime.ClipRuntime.begin_step, runtime.ClipRuntime.end_step
    for _ in range(reps):
        hooks.remove(clip)
        hooks.remove(clip2)
        out[0].append(plain.block(steps))
        hooks.register(clip)
        out[1].append(full.block(steps))
        hooks.remove(clip)
        hooks.register(clip2)
        runtime.ClipRuntime.begin_step, runtime.ClipRuntime.end_step = _least_begin, _least_end
        try:
            out[2].append(bare.block(steps))
        finally:
            runtime.ClipRuntime.begin_step, runtime.ClipRuntime.end_step = begin, end
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; "
          f"{args.tensors} tensors, Adam(foreach); us per step")
    total, parts = timed_parts(args.tensors, args.steps)
    print(f"compile_step with timers: {total * 1e6:.1f} per step; inclusive time per function:")
    for k, s in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:32s} {s * 1e6:8.1f}")
    plain, full, bare = least(args.tensors, args.steps // 4, args.reps)
    base = statistics.median(plain)
    print(f"interleaved, median of {args.reps} reps of {args.steps // 4} steps:")
    for name, ts in (("plain torch.compile(opt.step)", plain), ("compile_step", full),
                     ("compile_step, least pre/post-hook work", bare)):
        print(f"  {name:42s} {statistics.median(ts) * 1e6:8.1f}  {statistics.median(ts) / base:5.2f}x")


if __name__ == "__main__":
    main()
