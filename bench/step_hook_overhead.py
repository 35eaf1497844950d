"""Host overhead of a compiled optimizer step, in microseconds per step: plain
``torch.compile(opt.step)`` with no clip alive, against ``clip.compile_step(opt)`` after an eager
backward and after a backward of a model compiled with the clip. Tiny tensors on one thread, so
that the Python around the kernels is what is measured.

    .venv/bin/python bench/step_hook_overhead.py [--tensors 16 512] [--reps 7] [--steps 100]

Each step follows a fresh backward (untimed); only the step call is timed. One repetition times
``--steps`` steps of every variant, the plain one while the clip's global step hooks are
unregistered (as in a process without a clip). Printed: median [min, max] over repetitions of
the median time per step, the ratio of the medians to plain, and the median [min, max] of the
ratios of each repetition to plain's in the same repetition.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import compileclip
from compileclip import hooks


def model_of(n: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(n // 2)])


class Variant:
    """One training loop; ``block(steps)`` returns the mean seconds of its step calls."""

    def __init__(self, n: int, seed: int, step_of, run_of=lambda m: m) -> None:
        self.model = model_of(n, seed)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, foreach=True)
        self.run = run_of(self.model)
        self.step = step_of(self.opt)
        self.x = torch.randn(2, 4)

    def block(self, steps: int) -> float:
        """The median of ``steps`` step calls, in seconds (a median: a step the machine's
        neighbours or the garbage collector slowed does not move it)."""
        times = []
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            self.run(self.x).sum().backward()
            t = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def measure(n: int, reps: int, steps: int) -> dict[str, list[float]]:
    clip = compileclip.clip_backend(max_norm=1e-3)
    hooks.remove(clip)  # plain is compiled and run with no clip hooks, as in a process without one
    plain = Variant(n, 0, lambda o: torch.compile(o.step))
    plain.block(3)
    hooks.register(clip)
    variants = {
        "compile_step, eager model": Variant(n, 1, clip.compile_step),
        "compile_step, model compiled with the clip": Variant(
            n, 2, clip.compile_step, lambda m: torch.compile(m, backend=clip)),
    }
    for v in variants.values():
        v.block(3)
    times = {"plain torch.compile(opt.step)": [], **{k: [] for k in variants}}
    for _ in range(reps):  # interleaved
        hooks.remove(clip)
        times["plain torch.compile(opt.step)"].append(plain.block(steps))
        hooks.register(clip)
        for name, v in variants.items():
            times[name].append(v.block(steps))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tensors", type=int, nargs="+", default=[16, 512])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; Adam(foreach) "
          f"over tiny tensors; us per step call, median [min, max] over {args.reps} reps of {args.steps} steps")
    for n in args.tensors:
        times = measure(n, args.reps, args.steps)
        base = statistics.median(times["plain torch.compile(opt.step)"])
        print(f"{n} tensors")
        plain = times["plain torch.compile(opt.step)"]
        for name, ts in times.items():
            med = statistics.median(ts)
            # the ratio of each repetition to plain's in the same repetition (paired): median [min, max]
            ratios = sorted(t / p for t, p in zip(ts, plain))
            print(f"  {name:45s} {med * 1e6:8.1f} [{min(ts) * 1e6:.1f}, {max(ts) * 1e6:.1f}]  {med / base:5.2f}x"
                  f"  paired {statistics.median(ratios):5.2f}x [{ratios[0]:.2f}, {ratios[-1]:.2f}]")


if __name__ == "__main__":
    main()
