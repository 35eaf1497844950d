"""Host costs of the scope and the step plan, in microseconds (one thread, tiny tensors, so that
the Python around the kernels is what is measured):

- ``step``: an eager ``opt.step()`` (SGD, lr 0) of a model compiled with the clip, per step,
  against the same step with no clip alive: the hooks, the facts, the plan, the norm stitched
  from the backward's records, the scale; for 16 and 512 parameters;
- ``grad_scaler_check``: the bounded look at the callers' code objects for ``GradScaler.step``;
- ``heap scan``: the fallback scans (``discover.find_optimizers``: one ``gc.get_objects()``
  pass), with about 0.1M and 1M extra live objects.

    .venv/bin/python bench/scope_overhead.py [--reps 7] [--steps 200]

Variants interleaved, ``--reps`` repetitions; printed: median [min, max] per call.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch

import compileclip
from compileclip import discover, eager


def model_of(n: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(n // 2)])


def step_timer(n: int, with_clip: bool, steps: int):
    model = model_of(n)
    run = model
    if with_clip:
        clip = compileclip.clip_backend(max_norm=1e-3, inner="aot_eager")
        run = torch.compile(model, backend=clip)
    else:
        clip = None
        run = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(2, 4)

    def once() -> float:
        total = 0.0
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            run(x).sum().backward()
            t = time.perf_counter()
            opt.step()
            total += time.perf_counter() - t
        return total / steps * 1e6

    once()  # compile, warm up
    return once, clip


def stats(ts) -> str:
    return f"median {statistics.median(ts):9.1f}  [{min(ts):9.1f}, {max(ts):9.1f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; "
          f"us per call, {args.reps} interleaved repetitions")
    for n in (16, 512):
        # the plain one first: before any clip exists, the global hooks are not even registered
        plain, _ = step_timer(n, False, args.steps)
        base = [plain() for _ in range(args.reps)]
        clipped, clip = step_timer(n, True, args.steps)
        both = {"no clip": [], "clip": []}
        for _ in range(args.reps):
            both["no clip"].append(plain())
            both["clip"].append(clipped())
        print(f"  step, {n:4d} parameters: no clip alive {stats(base)}")
        for name, ts in both.items():
            print(f"  step, {n:4d} parameters: {name:13s} {stats(ts)}")
        print(f"    stats: {clip.stats}")
        clip.remove()
        del clip
    ts = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for _ in range(10000):
            eager.called_from_grad_scaler()
        ts.append((time.perf_counter() - t) / 10000 * 1e6)
    print(f"  grad_scaler_check:                 {stats(ts)}")
    rt = compileclip.clip_backend(max_norm=1.0)._runtime
    for extra in (100_000, 1_000_000):
        junk = [[i] for i in range(extra)]  # live, gc-tracked objects
        ts = []
        for _ in range(max(3, args.reps // 2)):
            discover._searched.clear()
            t = time.perf_counter()
            discover.find_optimizers(rt)
            ts.append((time.perf_counter() - t) * 1e6)
        print(f"  heap scan, {len(gc.get_objects()):8d} objects:      {stats(ts)}")
        del junk


if __name__ == "__main__":
    main()
