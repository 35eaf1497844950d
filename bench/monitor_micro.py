"""The per-step host and kernel cost of the monitoring options, measured alone (no training step
around them, where a 50 ms step's noise hides a few µs): what ``finish`` (history and the
policy's update), the eager threshold, and ``per_param_norms``' assembly add per step.

    python bench/monitor_micro.py [--device cpu|cuda] [--reps 2000]

Prints the median µs per call (and a bootstrap 95% CI), machine and torch version.
"""

from __future__ import annotations

import argparse
import platform
import time
import weakref

import numpy as np
import torch

from compileclip import Percentile, ZScore
from compileclip.config import ClipConfig
from compileclip.monitor import Monitor


def _median_ci(xs, boot=2000, seed=0):
    xs = np.asarray(xs)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(xs, (boot, xs.size)), axis=1)
    return float(np.median(xs)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def _time(fn, reps, device):
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    total = torch.tensor(1.5, device=dev)
    fixed = torch.tensor(1.0, device=dev)
    cases = {
        "finish, no options (the default)": (dict(max_norm=1.0), "record"),
        "finish, history=1000": (dict(max_norm=1.0, history=1000), "record"),
        "finish + threshold, ZScore": (dict(max_norm=ZScore(warmup=5)), "policy"),
        "finish + threshold, Percentile(window=1000)": (dict(max_norm=Percentile(warmup=5)), "policy"),
    }
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {dev}, "
          f"{torch.get_num_threads()} thread(s); median µs per step [95% CI]")
    for name, (kwargs, kind) in cases.items():
        mon = Monitor(ClipConfig(**kwargs))

        def step(mon=mon, kind=kind):
            thr = mon.policy_threshold(total) if kind == "policy" else fixed
            mon.record(total, thr)

        _time(step, 50, dev)  # warm-up
        med, lo, hi = _median_ci(_time(step, args.reps, dev))
        print(f"  {name:48s} {med:8.1f} [{lo:.1f}, {hi:.1f}]")
    params = [torch.nn.Parameter(torch.zeros(4, device=dev)) for _ in range(512)]
    parts = torch.zeros(512, device=dev)
    for n in (16, 512):
        mon = Monitor(ClipConfig(max_norm=1.0, per_param_norms=True))
        refs = [weakref.ref(p) for p in params[:n]]

        class _Run:
            pass
        run = _Run()
        run.parts, run.params = parts[:n], tuple(refs)
        _time(lambda: mon.record_run_norms([run], [], []), 50, dev)
        med, lo, hi = _median_ci(_time(lambda: mon.record_run_norms([run], [], []), args.reps, dev))
        print(f"  {'per_param_norms assembly, ' + str(n) + ' gradients':48s} {med:8.1f} [{lo:.1f}, {hi:.1f}]")
    # AGC costs per parameter, inside the step: see monitor_overhead.py


if __name__ == "__main__":
    main()
