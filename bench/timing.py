"""Paired, interleaved timing and the bootstrap confidence intervals of the overheads.

One repetition runs, for every variant in a fresh random order, one untimed step and then a
timed block of ``steps`` steps; GC is collected before and paused during the repetition. The
per-step time of a block is block time / steps. Variant and baseline blocks of the same
repetition are close in time, so their difference (the paired difference) cancels most of
the drift of a shared machine.

Overhead of a variant = the median (or mean, ``stat``) over repetitions of its paired
differences with its no-clip baseline. Ratio = that overhead / the reference variant's
overhead. Both get a 95% confidence interval from a paired bootstrap: resample repetition
indices with replacement (the same indices for numerator and denominator, so their
correlation is kept), recompute, take the 2.5% and 97.5% quantiles.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_block(fn: Callable, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds fn takes: ``clock`` (perf_counter; time.process_time for the process's CPU
    time) on CPU, CUDA events (after a synchronize) on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = clock()
    fn()
    return clock() - t0


@contextlib.contextmanager
def gc_paused():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def interleaved(steps_of: dict[str, Callable[[], None]], reps: int, steps: int,
                device: torch.device, seed: int = 0, tick: Callable[[int], None] | None = None,
                budget_s: float | None = None, min_reps: int = 0,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """``reps`` repetitions; in each, every entry of ``steps_of`` (one training step) runs one
    untimed step and a timed block of ``steps`` steps, in a random order. With ``budget_s``,
    stops after the repetition that passes it (but not before ``min_reps``; the budget is wall
    time). Returns seconds per step (of ``clock``, see time_block), one value per repetition,
    per name."""
    rng = np.random.default_rng(seed)
    names = list(steps_of)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(reps):
        if budget_s is not None and r >= min_reps and time.perf_counter() - start > budget_s:
            break
        with gc_paused():
            for i in rng.permutation(len(names)):
                name, step = names[i], steps_of[names[i]]
                step()  # not timed: the block does not start in the caches the last one left

                def block():
                    for _ in range(steps):
                        step()
                times[name].append(time_block(block, device, clock) / steps)
                if tick:
                    tick(steps + 1)
    return times


STATS = {"median": np.median, "mean": np.mean}


def _quantiles(x: np.ndarray) -> tuple[float, float, float]:
    lo, mid, hi = np.quantile(x, [0.025, 0.5, 0.975], method="inverted_cdf")
    return float(lo), float(mid), float(hi)


def resolved(value: float, lo: float, hi: float) -> bool:
    """The 95% CI is narrower than a third of the figure."""
    return bool(np.isfinite(lo) and np.isfinite(hi) and (hi - lo) < abs(value) / 3)


def overhead_ci(t_v, t_b, stat: str = "median", boot: int = 5000, seed: int = 0) -> dict:
    """Overhead of v over its baseline b in ms: the point estimate (stat of the paired
    differences), the bootstrap median and 95% CI."""
    d = 1e3 * (np.asarray(t_v) - np.asarray(t_b))
    f = STATS[stat]
    idx = np.random.default_rng(seed).integers(0, len(d), (boot, len(d)))
    lo, mid, hi = _quantiles(f(d[idx], axis=1))
    point = float(f(d))
    q1, q3 = np.percentile(d, [25, 75])
    return {"ms": point, "boot_median_ms": mid, "ci_ms": [lo, hi], "iqr_ms": float(q3 - q1),
            "resolved": resolved(point, lo, hi)}


def ratio_ci(t_v, t_b, t_r, t_rb, stat: str = "median", boot: int = 5000, seed: int = 0,
             target: float | None = None) -> dict:
    """(v - b) / (r - rb): the overhead of v over its baseline divided by the reference's
    overhead over its own, all paired by repetition. A resample whose reference overhead is
    <= 0 gives an unbounded ratio (+inf), which shows as an open CI."""
    d = np.asarray(t_v) - np.asarray(t_b)
    dr = np.asarray(t_r) - np.asarray(t_rb)
    f = STATS[stat]
    idx = np.random.default_rng(seed).integers(0, len(d), (boot, len(d)))
    num, den = f(d[idx], axis=1), f(dr[idx], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, num / den, np.inf)
    lo, mid, hi = _quantiles(r)
    den0 = float(f(dr))
    point = float(f(d)) / den0 if den0 > 0 else float("inf")
    out = {"ratio": mid, "point": point, "ci": [lo, hi], "resolved": resolved(mid, lo, hi),
           "ref_overhead_le_0": float(np.mean(den <= 0)), "target": target}
    if target is not None:
        out["verdict"] = ("meets" if hi <= target else "misses" if lo > target else "undecided")
    return out


def step_stats(times: list[float]) -> dict:
    a = 1e3 * np.asarray(times)
    q1, q3 = np.percentile(a, [25, 75])
    return {"median_ms": float(np.median(a)), "min_ms": float(a.min()), "max_ms": float(a.max()),
            "iqr_ms": float(q3 - q1), "times_ms": [round(float(t), 4) for t in a]}


# ---------------------------------------------------------------------------------------
# how contended the machine was
# ---------------------------------------------------------------------------------------
def busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (/proc/stat; 0 where unavailable)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in r)


@contextlib.contextmanager
def other_load(result: dict):
    """Sets result['other_cores'] to how many cores other processes kept busy, on average,
    while the block ran, and result['wall_s']."""
    busy, own, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    yield
    wall_s = time.perf_counter() - t0
    other = (busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)
    result["other_cores"] = max(0.0, other / wall_s) if busy else None
    result["wall_s"] = wall_s
