"""Per-step overhead of clipping fused into the compiled optimizer step.

    python bench/step_overhead.py                 # 4-layer 1024-wide MLP + LayerNorm, Adam, CPU
    python bench/step_overhead.py --reps 60 --steps 5 --device cuda

Every variant compiles the model with plain Inductor and owns a deep copy of it (same seed,
same weights) and its own Adam (foreach); all train on one fixed batch:

    floor          compiled model + compiled step, no clipping
    eager_clip     compiled model + eager clip_grad_norm_ + compiled step (no clip)
    step_clip      compiled model + torch.compile(opt.step, backend=clip_backend(max_norm))
    step_clip_nowb the same with step_writes_grad=False (.grad is left unclipped)

Before timing, the clipping variants must match eager_clip's parameters after the check steps.
Then ``--reps`` rounds, each timing ``--steps`` steps of every variant in a rotated order
(interleaved, so drift in the machine's load hits all variants alike). Reported: the median
and IQR of ms per step, and of the overhead over ``floor`` paired within a round.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

from compileclip import clip_backend

VARIANTS = ["floor", "eager_clip", "step_clip", "step_clip_nowb"]


def make_model(width: int, layers: int) -> nn.Module:
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*mods)


def wait_for_quiet(limit: float, max_wait: float) -> float:
    start = time.time()
    while True:
        load = os.getloadavg()[0]
        if load < limit or time.time() - start > max_wait:
            return load
        print(f"load average {load:.2f} >= {limit}: waiting", file=sys.stderr, flush=True)
        time.sleep(15)


class Variant:
    def __init__(self, name: str, base: nn.Module, max_norm: float) -> None:
        self.name = name
        self.model = copy.deepcopy(base)
        self.compiled = torch.compile(self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, foreach=True)
        self.max_norm = max_norm
        if name in ("floor", "eager_clip"):
            backend = "inductor"
        else:
            backend = clip_backend(max_norm, step_writes_grad=(name == "step_clip"))
        self.step_fn = torch.compile(self.opt.step, backend=backend)

    def step(self, x: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.compiled(x).float().pow(2).mean().backward()
        if self.name == "eager_clip":
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm, foreach=True)
        self.step_fn()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def q(xs: list[float], p: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(p) - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-norm", type=float, default=1e-2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--load-limit", type=float, default=1.3)
    ap.add_argument("--max-wait", type=float, default=900.0)
    args = ap.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    base = make_model(args.width, args.layers).to(device)
    x = torch.randn(args.batch, args.width, device=device)
    n_params = sum(p.numel() for p in base.parameters())
    variants = [Variant(name, base, args.max_norm) for name in VARIANTS]

    # compile, then check: the clipping variants must agree with eager clipping
    for v in variants:
        for _ in range(args.warmup):
            v.step(x)
    sync(device)
    ref = dict(variants[1].model.named_parameters())
    for v in variants[2:]:
        for name, p in v.model.named_parameters():
            torch.testing.assert_close(p, ref[name], msg=lambda m: f"{v.name} param {name}: {m}")

    load = wait_for_quiet(args.load_limit, args.max_wait)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for rep in range(args.reps):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                v.step(x)
            sync(device)
            times[v.name].append((time.perf_counter() - t0) / args.steps * 1e3)
    end_load = os.getloadavg()[0]

    print(f"# step overhead: {args.layers}x{args.width} MLP+LayerNorm, {n_params / 1e6:.2f}M params, "
          f"Adam(foreach), batch {args.batch}, {device}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# {args.reps} interleaved rounds x {args.steps} steps; load average {load:.2f} at start, "
          f"{end_load:.2f} at end")
    print("| variant | ms/step median | IQR | overhead vs floor, median | IQR |")
    print("| --- | --- | --- | --- | --- |")
    floor = times["floor"]
    for v in variants:
        t = times[v.name]
        over = [a - b for a, b in zip(t, floor)]
        print(f"| {v.name} | {statistics.median(t):.2f} | {q(t, 25):.2f}-{q(t, 75):.2f} | "
              f"{statistics.median(over):+.2f} | {q(over, 25):+.2f}..{q(over, 75):+.2f} |")


if __name__ == "__main__":
    main()
