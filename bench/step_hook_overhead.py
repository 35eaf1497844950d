"""Host overhead of a compiled optimizer step, in microseconds: plain ``torch.compile(opt.step)``,
the same while a clip exists (torch's global step hooks then make an eager call per step), and
``clip.compile_step(opt)``. A tiny model, so that the Python around the kernels dominates.

    .venv/bin/python bench/step_hook_overhead.py [--reps 9] [--calls 300]

The three variants are timed interleaved, ``--reps`` times ``--calls`` calls each; printed:
median, min and max of the per-call time over the repetitions.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import compileclip


def make_opt(seed: int = 0) -> torch.optim.Optimizer:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 8)
    model(torch.randn(2, 8)).sum().backward()
    return torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    # plain first: before any clip exists, the global hooks are not even registered
    plain = torch.compile(make_opt().step)
    for _ in range(20):
        plain()
    alone = [per_call_us(plain, args.calls) for _ in range(args.reps)]
    clip = compileclip.clip_backend(max_norm=1e6)
    variants = {
        "torch.compile(opt.step), a clip alive": torch.compile(make_opt(1).step),
        "clip.compile_step(opt)": clip.compile_step(make_opt(2)),
    }
    for fn in variants.values():
        for _ in range(20):
            fn()
    times = {name: [] for name in variants}
    for _ in range(args.reps):  # interleaved
        for name, fn in variants.items():
            times[name].append(per_call_us(fn, args.calls))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; Adam on 2 tensors; us per call over {args.reps} reps")
    rows = {"torch.compile(opt.step), no clip": alone, **times}
    for name, ts in rows.items():
        print(f"  {name:40s} median {statistics.median(ts):7.1f}  min {min(ts):7.1f}  max {max(ts):7.1f}")


if __name__ == "__main__":
    main()
