"""Host cost of the exactness bookkeeping per step, by number of gradients.

Each step the runtime records the backward graph's norm with its gradients (storage, address
and version of each), confirms the record when the backward ends, and checks it at the
optimizer step (is every .grad still that tensor, unchanged?). This times those three on
synthetic parameters, no compile, and reports the median with a 95% bootstrap CI:

    .venv/bin/python bench/record_overhead.py [--out bench/results/issue9/record_overhead.txt]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from compileclip import identity, records
from compileclip.config import ClipConfig
from compileclip.runtime import ClipRuntime


def measure(n: int, reps: int = 300) -> tuple[list[float], list[float]]:
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(4)
    opt = torch.optim.SGD(params, lr=0.1)
    rt = ClipRuntime(ClipConfig(max_norm=1.0))
    norms = (torch.ones(n),)
    refs = identity.weak(params)
    grads = [p.grad for p in params]
    rec, step = [], []
    for _ in range(reps):
        t = time.perf_counter()
        # what ClipRuntime.record_run and _end_of_backward do (without autograd's callback)
        rt._pending.append((norms, refs, identity.storages(grads), identity.data_ptrs(grads),
                            tuple(identity.versions(grads))))
        rt._end_of_backward()
        rec.append(time.perf_counter() - t)
        t = time.perf_counter()
        # which norms the step may take from the record (records.ordered_norms's checks)
        ps = identity.step_params(opt)
        entries = [list(zip((id(r()) for r in run.params), run.intact())) for run in rt.runs]
        sources = records.assign_norms(entries, [id(p) for p in ps])
        step.append(time.perf_counter() - t)
        assert None not in sources
        rt.runs.clear()
    return rec, step


def ci(xs: list[float], boot: int = 2000) -> tuple[float, float, float]:
    a = np.asarray(xs) * 1e6
    rng = np.random.default_rng(0)
    meds = np.median(rng.choice(a, size=(boot, len(a))), axis=1)
    return float(np.median(a)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads; median us per step [95% CI]"]
    for n in (16, 256, 1024):
        rec, step = measure(n)
        r, s = ci(rec), ci(step)
        lines.append(f"{n:5d} gradients: record+confirm {r[0]:7.1f} [{r[1]:.1f}, {r[2]:.1f}]   "
                     f"step check {s[0]:7.1f} [{s[1]:.1f}, {s[2]:.1f}]   per gradient {(r[0] + s[0]) / n:.2f}")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
