"""Per-step overhead of gradient-norm clipping in compiled training, with and without compileclip.

    .venv/bin/python bench/bench.py                      # default: mlp, deep (512 tensors), gpt on CPU
    .venv/bin/python bench/bench.py --quick --workloads mlp
    .venv/bin/python bench/bench.py --workloads mlp,deep --reps 60 --steps 5 --all

Per workload, five phases (their wall times are printed and recorded):

1. build      the model, its batch, and the variants (bench/variants.py: a table)
2. compile    the first steps of every variant with Dynamo reset and the FX graph and
              AOTAutograd caches off: compile time and Inductor kernels of the model (forward
              + backward) and of the step, with and without the clip
3. check      every clipping variant against eager clip_grad_norm_ (parameters, the .grad the
              optimizer consumed, total norm) from the same state, with the clip active;
              any difference: printed, exit 1
4. timing     paired, interleaved repetitions (bench/timing.py); overheads and ratios with
              paired-bootstrap 95% confidence intervals
5. profile    a few steps of each clipping variant and its baseline under torch.profiler: the
              ops the clip adds (bench/opprofile.py)

After the workloads, bench/spike.py (a gradient spike under the ZScore policy, the monitoring
API's plot and summary in --out; --no-spike skips it).

See bench/README.md for the method and how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import opprofile  # noqa: E402
import report  # noqa: E402
import spike  # noqa: E402
import timing  # noqa: E402
import variants as V  # noqa: E402
import workloads as W  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
QUICK_SIZE = {"mlp": 0.5, "deep": 0.25, "gpt": 0.5, "lstm": 0.5}
MIN_REPS, MAX_REPS = 6, 200


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=",".join(W.DEFAULT),
                   help=f"comma list from {','.join(W.ALL)} (default {','.join(W.DEFAULT)})")
    p.add_argument("--size", default="", help="scale: one float for all, or name=float,... "
                   f"(default 1: {W.DEFAULT_SIZE})")
    p.add_argument("--variants", default=None,
                   help=f"comma list from {','.join(V.BY_NAME)} (their baselines and references "
                        "are added); default: the issue's set")
    p.add_argument("--full", action="store_true",
                   help="the issue's variants on every workload (default: deep and gpt leave out "
                        "the compiled-step ones; with them a run takes 20-40 min on 2 CPU cores)")
    p.add_argument("--all", action="store_true", help="every variant, every workload (slowest)")
    p.add_argument("--reps", type=int, default=None,
                   help="interleaved repetitions (default: as many as --time-budget allows, "
                        f"{MIN_REPS} to {MAX_REPS})")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of timing per workload when --reps is not given (default 30)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default 3)")
    p.add_argument("--check-steps", type=int, default=2, help="steps checked against eager")
    p.add_argument("--stat", choices=list(timing.STATS), default="median",
                   help="statistic of the paired differences (default median)")
    p.add_argument("--boot", type=int, default=5000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="order of the variants, bootstrap")
    p.add_argument("--max-norm", type=float, default=1e-2, help="clip threshold (default 0.01)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--profile-steps", type=int, default=None, help="profiled steps (default 2; 0: off)")
    p.add_argument("--kernel-profile", action="store_true",
                   help="compile with cpp.enable_kernel_profile: Inductor kernels by name in the "
                        "profile (adds a RECORD_FUNCTION per kernel call to every step)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="directory for .json/.md/.png (default bench/results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-spike", action="store_true",
                   help="skip the gradient-spike demo (bench/spike.py: GPT size "
                        f"{spike.DEFAULT_SIZE}, {spike.DEFAULT_STEPS} steps under ZScore, "
                        "one thread, ~1 min on this CPU) that runs after the workloads")
    p.add_argument("--quick", action="store_true",
                   help=f"development run: sizes {QUICK_SIZE} unless --size, 6 reps x 2 steps, "
                        "1 profiled step")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in W.ALL:
            p.error(f"unknown workload {w!r}; choose from {W.ALL}")
    args.size = parse_sizes(args.size, QUICK_SIZE if args.quick else W.DEFAULT_SIZE, p)
    quick = args.quick
    args.time_budget = args.time_budget or (10.0 if quick else 30.0)
    args.steps = args.steps or (2 if quick else 3)
    args.profile_steps = (1 if quick else 2) if args.profile_steps is None else args.profile_steps
    try:
        names = args.variants and [n.strip() for n in args.variants.split(",") if n.strip()]
        args.variant_names = names or None
        args.specs = {w: V.select(args.variant_names, args.all, w, args.full) for w in args.workloads}
    except ValueError as e:
        p.error(str(e))
    if args.check_steps < 1:
        p.error("--check-steps must be >= 1")
    return args


def parse_sizes(text: str, defaults: dict, parser) -> dict[str, float]:
    sizes = dict(defaults)
    if not text:
        return sizes
    if "=" not in text:
        return {w: float(text) for w in sizes}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in sizes:
            parser.error(f"--size: unknown workload {name!r}")
        sizes[name.strip()] = float(value)
    return sizes


# ---------------------------------------------------------------------------------------
# phase 2: compile
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def fresh_compile():
    """No FX graph cache or AOTAutograd cache hits (from disk or an earlier variant), so
    compile times and kernel counts do not depend on earlier runs. (Inductor's C++ build of a
    kernel source it has built before is still reused from its cache directory.)"""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def kernels() -> int:
    return torch._inductor.metrics.generated_kernel_count


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def phase_walls(v: V.Variant, batch, device) -> tuple[float, float, int, int]:
    """One step, split: (forward+backward seconds, clip+step seconds, kernels generated in
    each)."""
    k0 = kernels()
    timing.sync(device)
    t0 = time.perf_counter()
    v.opt.zero_grad(set_to_none=True)
    v.forward(*batch).backward()
    timing.sync(device)
    t1, k1 = time.perf_counter(), kernels()
    if v.clip is not None:
        v.clip(v.params)
    v.step()
    timing.sync(device)
    return t1 - t0, time.perf_counter() - t1, k1 - k0, kernels() - k1


def compile_variants(vs: dict[str, V.Variant], batch, device, first: int = 2, steady: int = 2,
                     log=print) -> dict:
    """The first ``first`` steps of every variant, in table order, with fresh compiles; compile
    time = their wall time minus ``first`` x the fastest of ``steady`` later steps, per phase."""
    torch._dynamo.reset()
    out = {}
    for name, v in vs.items():
        s = v.spec
        if (s.shares or s.model == "eager") and s.clip != "compiled":  # nothing new to compile
            with fresh_compile():
                walls = [phase_walls(v, batch, device)]
            if walls[0][2] + walls[0][3]:
                log(f"   {name}: {walls[0][2] + walls[0][3]} kernels compiled where none were expected")
            continue
        g0, t0 = unique_graphs(), time.perf_counter()
        with fresh_compile():
            walls = [phase_walls(v, batch, device) for _ in range(first)]
        later = [phase_walls(v, batch, device) for _ in range(steady)]
        fm, fs = (min(w[i] for w in later) for i in (0, 1))
        mk, sk = sum(w[2] for w in walls), sum(w[3] for w in walls)
        out[name] = row = {  # a phase that generated no kernel compiled nothing (caches are off)
            "model_s": max(0.0, sum(w[0] for w in walls) - first * fm) if mk else None,
            "step_s": max(0.0, sum(w[1] for w in walls) - first * fs) if sk else None,
            "model_kernels": mk, "step_kernels": sk, "graphs": unique_graphs() - g0,
            "late_kernels": sum(w[2] + w[3] for w in later),  # > 0: compiled after the first steps
        }
        log(f"   {name:22s} {time.perf_counter() - t0:6.1f} s: model compile "
            f"{report.fmt(row['model_s'], '6.1f', '     -')} s, {mk:4d} kernels; step compile "
            f"{report.fmt(row['step_s'], '6.1f', '     -')} s, {sk:4d} kernels")
    return out


# ---------------------------------------------------------------------------------------
# phase 3: check
# ---------------------------------------------------------------------------------------
class CheckFailed(SystemExit):
    """Exits with status 1 and the message."""


def state_of(v: V.Variant) -> tuple[list, list]:
    with torch.no_grad():
        params = [p.detach().clone() for p in v.params]
        opt = [{k: t.clone() for k, t in v.opt.state[p].items() if isinstance(t, torch.Tensor)}
               for p in v.params]
    return params, opt


@torch.no_grad()
def load_state(v: V.Variant, state) -> None:
    """In place (no recompile): parameters and Adam state."""
    params, opt = state
    for p, src, st in zip(v.params, params, opt):
        p.copy_(src)
        for k, t in st.items():
            v.opt.state[p][k].copy_(t)


def check(vs: dict[str, V.Variant], batch, args) -> dict:
    """``check_steps`` times: eager_clip takes one step; every clipping variant takes one step
    from eager_clip's state before that step; .grad (as the optimizer consumed it), total norm
    and parameters after the step must match. Each comparison is thus of one step from the same
    state: over several steps Adam turns rounding differences of near-zero gradient elements
    into parameter differences of the order of the learning rate."""
    ref = vs[V.REFERENCE]
    clipping = [v for v in vs.values() if v.clips and v is not ref]
    worst, failures = {v.name: 0.0 for v in clipping}, []
    for i in range(args.check_steps):
        before = state_of(ref)
        ref_norm = V.train_step(ref, batch)
        if not float(ref_norm) > args.max_norm:
            raise CheckFailed(f"clip not active: eager total norm {float(ref_norm):.4g} <= "
                              f"max_norm {args.max_norm}; lower --max-norm")
        for v in clipping:
            load_state(v, before)
            norm = V.train_step(v, batch)
            where = f"{v.name} vs {V.REFERENCE} at check step {i}"
            checks = [("total norm", norm, ref_norm), ("parameters", v.params, ref.params)]
            if v.spec.checks_grad:
                checks.append(("clipped .grad", [p.grad for p in v.params], [p.grad for p in ref.params]))
            for what, got, want in checks:
                if got is None:
                    failures.append(f"{what} of {where}: the variant returned none")
                    continue
                try:
                    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
                except AssertionError as e:
                    failures.append(f"{what} of {where}:\n{e}")
            with torch.no_grad():
                worst[v.name] = max(worst[v.name], max(float((a - b).abs().max())
                                                       for a, b in zip(v.params, ref.params)))
        if failures:
            raise CheckFailed("\nMISMATCH against eager clip_grad_norm_ (the benchmark stops):\n"
                              + "\n\n".join(failures) + "\n")
    return {"max_abs_param_diff": worst, "steps": args.check_steps, "rtol": RTOL, "atol": ATOL,
            "eager_total_norm": float(ref_norm), "max_norm": args.max_norm}


# ---------------------------------------------------------------------------------------
# phases 4 and 5, and one workload end to end
# ---------------------------------------------------------------------------------------
def timed_names(vs: dict[str, V.Variant]) -> list[str]:
    """eager_clip is the numerical reference; it is timed only with its baseline."""
    return [n for n, v in vs.items()
            if not (n == V.REFERENCE and v.spec.baseline not in vs)]


def choose_reps(steps_of, args) -> int:
    """As many repetitions as fit in --time-budget, from one step of every variant."""
    per_rep = 0.0
    for step in steps_of.values():
        t = time.perf_counter()
        step()
        per_rep += (time.perf_counter() - t) * (args.steps + 1)
    return max(MIN_REPS, min(MAX_REPS, int(args.time_budget / max(per_rep, 1e-9))))


def run_workload(name: str, args, log) -> dict:
    phases = {}
    t = time.perf_counter()
    wl = W.build(name, args.size[name], args.device)
    vs = V.build(args.specs[name], wl.model, args.max_norm)
    log(f"\n== {name}: {wl.desc}; {wl.params / 1e6:.2f}M params in {wl.tensors} tensors")
    phases["build"] = time.perf_counter() - t

    t = time.perf_counter()
    compiled = compile_variants(vs, wl.batch, args.device, log=log)
    phases["compile"] = time.perf_counter() - t

    t = time.perf_counter()
    checked = check(vs, wl.batch, args)
    phases["check"] = time.perf_counter() - t
    log(f"   check passed in {phases['check']:.1f} s (max |param - eager| "
        + ", ".join(f"{n} {d:.1e}" for n, d in checked["max_abs_param_diff"].items()) + ")")

    names = timed_names(vs)
    steps_of = {n: (lambda v=vs[n]: V.train_step(v, wl.batch)) for n in names}
    reps = args.reps or choose_reps(steps_of, args)
    log(f"   timing {reps} repetitions x {len(names)} variants x ({args.steps} + 1) steps"
        + ("" if args.reps else f" (fewer if the {args.time_budget:.0f} s budget runs out first)"))
    graphs0, load = unique_graphs(), {}
    total = reps * len(names) * (args.steps + 1)
    done = [0]

    def tick(n):
        done[0] += n
        if done[0] * 4 // total != (done[0] - n) * 4 // total:
            log(f"   timing {100 * done[0] // total}%")
    with timing.other_load(load):
        times = timing.interleaved(steps_of, reps, args.steps, args.device, args.seed, tick,
                                   None if args.reps else args.time_budget, MIN_REPS)
    reps = len(next(iter(times.values())))
    phases["timing"] = load["wall_s"]

    t = time.perf_counter()
    prof = {}
    if args.profile_steps:
        pairs = {n: vs[n].spec.baseline for n in names if vs[n].clips and vs[n].spec.baseline in vs}
        prof = opprofile.profile_variants(steps_of, pairs, args.profile_steps)
    phases["profile"] = time.perf_counter() - t
    log("   phases: " + ", ".join(f"{k} {s:.1f} s" for k, s in phases.items()))
    return report.summarize(wl, vs, names, times, compiled, checked, prof, phases, args, reps,
                            other_cores=load["other_cores"],
                            recompiles=unique_graphs() - graphs0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available in this torch build/machine")
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    record = {"stamp": report.stamp(args, ["bench/bench.py", *argv]), "config": report.config_of(args)}
    log = report.say
    log(f"torch {torch.__version__} on {record['stamp']['device_name']}, {torch.get_num_threads()} "
        f"threads; max_norm {args.max_norm}; {args.reps or 'budgeted'} reps x {args.steps} steps")
    results = {}
    patch = (torch._inductor.config.patch({"cpp.enable_kernel_profile": True})
             if args.kernel_profile else contextlib.nullcontext())
    with warnings.catch_warnings(record=True) as caught, patch:
        warnings.simplefilter("default")
        t = time.perf_counter()
        report.warm_up_compiler(args.device)
        record["warm_up_s"] = time.perf_counter() - t
        log(f"compiler warm-up (a tiny model, not reported) {record['warm_up_s']:.1f} s")
        for name in args.workloads:
            results[name] = run_workload(name, args, log)
            report.table(name, results[name])
        failed = False
        if not args.no_spike:
            failed = not run_spike(record, args, log)
    record.update(workloads=results, wall_s=time.perf_counter() - t0,
                  warnings=report.warning_lines(caught))
    report.write_outputs(record, Path(args.out), plot=not args.no_plot)
    return 1 if failed else 0


def run_spike(record: dict, args, log) -> bool:
    """bench/spike.py into --out (its own files); a short summary into the record. A failure is
    reported, the benchmark's outputs are still written, and the exit status is 1."""
    log(f"\n== spike: GPT size {spike.DEFAULT_SIZE} under ZScore, {spike.DEFAULT_STEPS} steps "
        "(bench/spike.py; --no-spike skips it)")
    t = time.perf_counter()
    try:
        s = spike.run(Path(args.out), device=args.device, seed=args.seed, log=log)
    except Exception as e:  # noqa: BLE001 - the workloads' results must still be written
        import traceback
        traceback.print_exc()
        log(f"PROBLEM: spike failed: {type(e).__name__}: {e}")
        record["spike"] = {"error": f"{type(e).__name__}: {e}"}
        return False
    record["spike"] = {k: s[k] for k in ("size", "steps", "spike_steps", "factor", "policy", "n_clipped",
                                         "clipped_steps", "suggest_max_norm_0.95", "plot")}
    record["spike"]["thresholds_at_spikes"] = {r["step"]: r["threshold"] for r in s["spikes"]}
    record["spike"]["wall_s"] = time.perf_counter() - t
    record["spike"]["files"] = f"{spike.STEM}.json, {spike.STEM}.md"
    return True


if __name__ == "__main__":
    sys.exit(main())
