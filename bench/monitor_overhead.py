"""Per-step cost of the monitoring and adaptive options against the same clip without them.

    .venv/bin/python bench/monitor_overhead.py                 # ~8-10 min on 2 CPU cores
    .venv/bin/python bench/monitor_overhead.py --quick         # small sizes, short budgets (development)
    .venv/bin/python bench/monitor_overhead.py --threads 1 --clock cpu --name monitor_overhead_cpu
                                                               # on a shared machine: CPU time

Every variant is ``torch.compile(model, backend=clip)`` with its own clip, model copy and
``Adam(lr=1e-3, foreach=True)``; the step is the eager ``opt.step()`` (the clip runs at the
step hook, from the norm the backward graph computed) or, on mlp only, ``clip.compile_step(opt)``
(the clip inside the compiled step):

    off         clip_backend(max_norm=0.01)                       the baseline
    history     clip_backend(max_norm=0.01, history=1000)         ring buffer of norms and thresholds
    per_param   clip_backend(max_norm=0.01, per_param_norms=True) each gradient's norm kept
    zscore      clip_backend(max_norm=ZScore(warmup=5))           ZClip threshold on the device
    percentile  clip_backend(max_norm=Percentile(warmup=5, window=1000))   AutoClip
    agc         clip_backend(max_norm=AGC())                      unit-wise clipping (NFNets)

Timing as bench/bench.py (bench/timing.py): compile (first steps, untimed), then interleaved
repetitions, each running every variant in a fresh random order, one untimed step and a timed
block of ``--steps`` steps; repetitions continue until the per-configuration time budget is
spent. Overhead of a variant = median over repetitions of its paired difference with ``off``;
95% CI from a paired bootstrap of the repetitions. Writes markdown and JSON (every per-block
time) to ``--out`` (default bench/results/issue10/monitor_overhead.{md,json}).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
import timing  # noqa: E402
import workloads as W  # noqa: E402

from compileclip import AGC, Percentile, ZScore, clip_backend  # noqa: E402

MAX_NORM = 0.01
VARIANTS = {
    "off": lambda: dict(max_norm=MAX_NORM),
    "history": lambda: dict(max_norm=MAX_NORM, history=1000),
    "per_param": lambda: dict(max_norm=MAX_NORM, per_param_norms=True),
    "zscore": lambda: dict(max_norm=ZScore(warmup=5)),
    "percentile": lambda: dict(max_norm=Percentile(warmup=5, window=1000)),
    "agc": lambda: dict(max_norm=AGC()),
}
DOC = {
    "off": "clip_backend(max_norm=0.01)",
    "history": "clip_backend(max_norm=0.01, history=1000)",
    "per_param": "clip_backend(max_norm=0.01, per_param_norms=True)",
    "zscore": "clip_backend(max_norm=ZScore(warmup=5))",
    "percentile": "clip_backend(max_norm=Percentile(warmup=5, window=1000))",
    "agc": "clip_backend(max_norm=AGC())",
}
# (label, workload, step): the step-compiled set only on mlp (compiling Adam over deep's 512
# tensors takes ~3 min per variant on 2 CPU cores)
CONFIGS = [("mlp", "mlp", "eager"), ("deep", "deep", "eager"), ("mlp, compile_step", "mlp", "compiled")]
QUICK_SIZE = {"mlp": 0.25, "deep": 0.125}
MIN_REPS, MAX_REPS = 6, 400
# wall: perf_counter, as bench.py. cpu: the process's CPU time (time.process_time), which a
# busy second process does not inflate by descheduling this one; meaningful with --threads 1
# (with 2 threads it also counts OpenMP's spin-waits). Not used on CUDA (events there).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
WARMUP_STEPS = 8  # past ZScore's and Percentile's warm-up (5), so their timed steps are adaptive


class Run:
    def __init__(self, name: str, base: torch.nn.Module, step_mode: str) -> None:
        self.name = name
        self.module = copy.deepcopy(base)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=1e-3, foreach=True)
        self.clip = clip_backend(**VARIANTS[name]())
        self.forward = torch.compile(self.module, backend=self.clip, dynamic=False)
        self.step = (self.clip.compile_step(self.opt, dynamic=False) if step_mode == "compiled"
                     else self.opt.step)

    def train_step(self, batch) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.forward(*batch).backward()
        self.step()


def sanity(r: Run) -> str:
    """What the option visibly did (host reads; after the timing)."""
    c = r.clip
    if r.name == "history":
        h = c.history
        return f"history holds {h.numel()} norms, last {float(h[-1]):.3g}"
    if r.name == "per_param":
        return f"{c.param_norms.numel()} per-parameter norms"
    if r.name in ("zscore", "percentile"):
        return f"threshold {float(c.threshold):.3g} at norm {float(c.total_norm):.3g}"
    if r.name == "agc":
        return f"threshold {float(c.threshold)} (nan: AGC), norm {float(c.total_norm):.3g}"
    return off_sanity(float(c.total_norm))


def off_sanity(norm: float) -> str:
    # the scale is a _foreach_mul_ by clamp(max_norm / norm, max=1) either way (no host branch)
    return (f"last norm {norm:.3g} > max_norm {MAX_NORM}: clipping" if norm > MAX_NORM else
            f"last norm {norm:.3g} <= max_norm {MAX_NORM} (was above it at the start of timing): "
            "coefficient 1 by then, the same kernels")


def run_config(label: str, workload: str, step_mode: str, args, log) -> dict:
    wl = W.build(workload, args.size[workload], args.device)
    log(f"\n== {label}: {wl.desc}; {wl.params / 1e6:.2f}M params in {wl.tensors} tensors; "
        f"step {'clip.compile_step(opt)' if step_mode == 'compiled' else 'eager opt.step()'}")
    torch._dynamo.reset()
    runs, compile_s = {}, {}
    for name in VARIANTS:
        t = time.perf_counter()
        runs[name] = r = Run(name, wl.model, step_mode)
        for _ in range(2):
            r.train_step(wl.batch)
        timing.sync(args.device)
        compile_s[name] = time.perf_counter() - t
        for _ in range(WARMUP_STEPS - 2):
            r.train_step(wl.batch)
        log(f"   {name:10s} first two steps (compile) {compile_s[name]:6.1f} s")
    off_norm = float(runs["off"].clip.total_norm)
    if not off_norm > MAX_NORM:
        raise SystemExit(f"{label}: the clip is not active at the start of timing (norm {off_norm:.3g} "
                         f"<= {MAX_NORM})")
    steps_of = {n: (lambda r=r: r.train_step(wl.batch)) for n, r in runs.items()}
    graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    load = {}
    with timing.other_load(load):
        times = timing.interleaved(steps_of, MAX_REPS, args.steps, args.device, args.seed,
                                   budget_s=args.budget, min_reps=MIN_REPS, clock=CLOCKS[args.clock])
    recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs0
    reps = len(times["off"])
    rows = {}
    off_med = float(np.median(times["off"]))
    for name in VARIANTS:
        st = timing.step_stats(times[name])
        row = {"doc": DOC[name], "median_us": 1e3 * st["median_ms"], "iqr_us": 1e3 * st["iqr_ms"],
               "compile_s": compile_s[name], "sanity": sanity(runs[name]), "times_ms": st["times_ms"]}
        if name != "off":
            o = timing.overhead_ci(times[name], times["off"], "median", args.boot, args.seed)
            row.update(overhead_us=1e3 * o["ms"], ci_us=[1e3 * x for x in o["ci_ms"]],
                       resolved=o["resolved"], overhead_pct=100 * 1e-3 * o["ms"] / off_med)
        rows[name] = row
    res = {"label": label, "workload": workload, "step": step_mode, "desc": wl.desc,
           "size": args.size[workload], "params": wl.params, "tensors": wl.tensors, "reps": reps,
           "steps": args.steps, "timing_s": load["wall_s"], "other_cores": load["other_cores"],
           "recompiles_during_timing": recompiles, "variants": rows}
    for line in table(res):
        log(line)
    return res


def fmt_us(x: float) -> str:
    return f"{x:+.0f}" if abs(x) >= 10 else f"{x:+.1f}"


def table(res: dict) -> list[str]:
    oc = res["other_cores"]
    lines = [f"{res['label']}: {res['desc']} ({res['tensors']} tensors), "
             f"{'clip.compile_step(opt)' if res['step'] == 'compiled' else 'eager opt.step()'}; "
             f"{res['reps']} reps x {res['steps']} steps; other processes kept "
             f"{'?' if oc is None else f'{oc:.2f}'} cores busy",
             "| variant | median us/step | IQR us | overhead us vs off | 95% CI | % of off | CI < 1/3 | 2 first steps s |",
             "|---|---:|---:|---:|---|---:|:---:|---:|"]
    for n, r in res["variants"].items():
        if n == "off":
            lines.append(f"| off | {r['median_us']:.0f} | {r['iqr_us']:.0f} | - | - | - | - | {r['compile_s']:.1f} |")
            continue
        lo, hi = r["ci_us"]
        lines.append(f"| {n} | {r['median_us']:.0f} | {r['iqr_us']:.0f} | {fmt_us(r['overhead_us'])} | "
                     f"[{fmt_us(lo)}, {fmt_us(hi)}] | {r['overhead_pct']:+.1f}% | "
                     f"{'yes' if r['resolved'] else 'no'} | {r['compile_s']:.1f} |")
    if res["recompiles_during_timing"]:
        lines.append(f"PROBLEM: {res['recompiles_during_timing']} Dynamo graphs compiled during timing")
    if (oc or 0) > 0.2:
        lines.append(f"PROBLEM: contended: other processes kept {oc:.2f} cores busy during timing")
    return lines


def markdown(record: dict) -> str:
    s = record["stamp"]
    md = ["# Per-step cost of history / per_param_norms / adaptive policies", "",
          f"- command: `{s['command']}`",
          f"- {s['date']}; torch {s['torch']}, python {s['python']}, git {s['git']}",
          f"- machine: {s['device_name']}, {s['threads']} torch threads ({s['cpu_count']} CPUs); "
          f"load average at start {', '.join(f'{x:.2f}' for x in s['loadavg_start'])}, at end "
          f"{', '.join(f'{x:.2f}' for x in s['loadavg_end'])}",
          "- every variant: `torch.compile(model, backend=clip)`, own model copy, "
          "`Adam(lr=1e-3, foreach=True)`; step as stated per table",
          f"- {WARMUP_STEPS} untimed steps per variant before timing (past the policies' warm-up of 5); "
          "interleaved repetitions in random order (bench/timing.py), per-step time = block / steps; "
          + ("clock: wall time (perf_counter)" if record["clock"] == "wall" else
             "clock: **process CPU time** (time.process_time), not wall time: robust to other processes "
             "descheduling this one; with 1 thread it is the work done"),
          f"- overhead = median of paired differences with `off`; 95% CI from {record['boot']} paired "
          "bootstrap resamples; `CI < 1/3` = the CI is narrower than a third of the figure (resolved)",
          "- `2 first steps s`: wall time of each variant's first two steps (compiles); the first "
          "variant of a table pays C++ kernel builds the later ones reuse",
          f"- wall time {record['wall_s']:.0f} s", ""]
    md += ["| variant | clip |", "|---|---|"] + [f"| {n} | `{d}` |" for n, d in DOC.items()] + [""]
    for res in record["configs"]:
        head, *rows = table(res)
        md += [f"## {res['label']}", "", head, "", *rows, ""]
        md += [f"- {n}: {r['sanity']}" for n, r in res["variants"].items()] + [""]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="mlp,deep,mlp-step",
                   help="comma list from mlp, deep, mlp-step (mlp with clip.compile_step)")
    p.add_argument("--size", default="", help="mlp=..,deep=.. (default 1: width 1024, 256 layers)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per configuration (default 50; --quick 10)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block (default 3)")
    p.add_argument("--boot", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZE}, 10 s budgets")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall (perf_counter, as bench.py; default) or cpu (process CPU time: "
                        "robust to other processes on the machine; use with --threads 1)")
    p.add_argument("--name", default="monitor_overhead", help="file stem in --out")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "issue10"),
                   help="directory for monitor_overhead.{md,json} (default bench/results/issue10)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.budget = args.budget or (10.0 if args.quick else 50.0)
    size_text, args.size = args.size, dict(QUICK_SIZE) if args.quick else {"mlp": 1.0, "deep": 1.0}
    for item in filter(None, size_text.split(",")):
        k, _, v = item.partition("=")
        if k not in args.size:
            p.error(f"--size: unknown workload {k!r}")
        args.size[k] = float(v)
    keys = {"mlp": CONFIGS[0], "deep": CONFIGS[1], "mlp-step": CONFIGS[2]}
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    if any(c not in keys for c in chosen):
        p.error(f"--configs: choose from {list(keys)}")

    t0 = time.perf_counter()
    stamp = report.stamp(args, ["bench/monitor_overhead.py", *argv])
    report.say(f"torch {torch.__version__} on {stamp['device_name']}, {torch.get_num_threads()} threads; "
               f"{args.budget:.0f} s of timing per configuration; clock {args.clock}")
    report.warm_up_compiler(args.device)
    configs = [run_config(*keys[c], args, report.say) for c in chosen]
    stamp["loadavg_end"] = os.getloadavg()
    record = {"stamp": stamp, "boot": args.boot, "budget_s": args.budget, "clock": args.clock, "configs": configs,
              "wall_s": time.perf_counter() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out / f"{args.name}.md").write_text(markdown(record))
    report.say(f"\nwrote {out}/{args.name}.md/.json in {record['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
