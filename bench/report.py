"""Summaries and outputs: the terminal table, JSON, markdown and PNG (matplotlib optional)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

import compileclip
import timing

COMPILE_TARGET = 0.15  # the clip's compile-time overhead the issue accepts


def say(msg: str) -> None:
    print(msg, flush=True)


def warm_up_compiler(device) -> None:
    """Compile a tiny model and Adam step once, so that the first workload's compile times do
    not include Dynamo's and Inductor's one-time imports and initialization."""
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()).to(device)
    opt = torch.optim.Adam(m.parameters(), foreach=True)
    f, step = torch.compile(m), torch.compile(opt.step)
    for _ in range(2):
        f(torch.randn(4, 8, device=device)).sum().backward()
        step()
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# one workload's summary
# ---------------------------------------------------------------------------------------
def _pct(clip: float, noclip: float):
    return clip / noclip - 1 if noclip > 0 else None


def compile_summary(c: dict) -> dict:
    """The clip's compile-time and kernel overhead: model (fwd+bwd) fused vs compiled_noclip,
    step step_fused vs cstep_noclip, and both (model + step) vs the two plain compiles."""
    out = {}

    def pair(key, clip_name, plain_name, field):
        if clip_name in c and plain_name in c and None not in (c[clip_name][field + "_s"],
                                                               c[plain_name][field + "_s"]):
            a, b = c[clip_name][field + "_s"], c[plain_name][field + "_s"]
            ka, kb = c[clip_name][field + "_kernels"], c[plain_name][field + "_kernels"]
            out[key] = {"clip": clip_name, "noclip": plain_name, "clip_s": a, "noclip_s": b,
                        "overhead": _pct(a, b), "clip_kernels": ka, "noclip_kernels": kb,
                        "extra_kernels": ka - kb}
    pair("model", "fused", "compiled_noclip", "model")
    pair("step", "step_fused", "cstep_noclip", "step")
    if {"both", "compiled_noclip", "cstep_noclip"} <= set(c) and None not in (
            c["both"]["model_s"], c["both"]["step_s"], c["compiled_noclip"]["model_s"],
            c["cstep_noclip"]["step_s"]):
        a = c["both"]["model_s"] + c["both"]["step_s"]
        b = c["compiled_noclip"]["model_s"] + c["cstep_noclip"]["step_s"]
        ka = c["both"]["model_kernels"] + c["both"]["step_kernels"]
        kb = c["compiled_noclip"]["model_kernels"] + c["cstep_noclip"]["step_kernels"]
        out["both"] = {"clip": "both", "noclip": "compiled_noclip + cstep_noclip", "clip_s": a,
                       "noclip_s": b, "overhead": _pct(a, b), "clip_kernels": ka,
                       "noclip_kernels": kb, "extra_kernels": ka - kb}
    for row in out.values():
        row["meets_target"] = row["overhead"] is not None and row["overhead"] <= COMPILE_TARGET
    return out


def summarize(wl, vs, names, times, compiled, checked, prof, phases, args, reps, other_cores,
              recompiles) -> dict:
    rows = {}
    for n in names:
        s, v = vs[n].spec, vs[n]
        rows[n] = row = timing.step_stats(times[n])
        row["doc"] = s.doc
        row["compile"] = compiled.get(n)
        row["clip_stats"] = v.backend.stats if v.backend is not None else None
        if s.baseline in times:
            row["overhead"] = timing.overhead_ci(times[n], times[s.baseline], args.stat, args.boot, args.seed)
            row["baseline"] = s.baseline
        ref = s.reference
        if ref and ref in times and vs[ref].spec.baseline in times:
            row["reference"] = ref
            row["ratio"] = timing.ratio_ci(times[n], times[s.baseline], times[ref],
                                           times[vs[ref].spec.baseline], args.stat, args.boot,
                                           args.seed, s.target)
    problems = []
    for n in names:
        st = rows[n]["clip_stats"]
        if n in ("fused", "both") and st and st.get("norm_at_step"):
            problems.append(f"{wl.name}: {n} computed norms at the step: {st}")
    for n, c in compiled.items():
        if c["late_kernels"]:
            problems.append(f"{wl.name}: {n} compiled {c['late_kernels']} kernels after its first steps")
    if recompiles:
        problems.append(f"{wl.name}: {recompiles} Dynamo graphs compiled during timing")
    if (other_cores or 0) > 0.2:
        problems.append(f"{wl.name}: timings contended: other processes kept {other_cores:.2f} "
                        "cores busy during timing")
    return {"desc": wl.desc, "size": wl.size, "params": wl.params, "tensors": wl.tensors,
            "grad_bytes": wl.grad_bytes, "variants_run": list(vs), "reps": reps,
            "steps": args.steps, "phases_s": phases, "compile": compiled,
            "compile_overhead": compile_summary(compiled), "check": checked,
            "other_processes_cores": other_cores, "recompiles_during_timing": recompiles,
            "variants": rows, "profile": prof, "problems": problems}


# ---------------------------------------------------------------------------------------
# terminal / markdown table
# ---------------------------------------------------------------------------------------
def fmt(x, spec: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def ci(lo, hi, spec) -> str:
    return f"[{fmt(lo, spec)}, {fmt(hi, spec)}]"


COLUMNS = [("variant", 18), ("med ms", 8), ("IQR", 6), ("ovh ms", 7), ("95% CI", 17),
           ("ok", 3), ("ratio", 6), ("95% CI", 14), ("ok", 3), ("target", 14)]


def head_lines(name: str, res: dict) -> list[str]:
    ph = res["phases_s"]
    lines = [f"{name}: {res['desc']} ({res['params'] / 1e6:.2f}M params, {res['tensors']} tensors); "
             f"{res['reps']} reps x {res['steps']} steps",
             "phases: " + ", ".join(f"{k} {s:.1f} s" for k, s in ph.items())
             + f"; other processes kept {fmt(res['other_processes_cores'], '.2f', '?')} cores busy "
             "during timing"]
    for key, c in res["compile_overhead"].items():
        lines.append(f"compile {key}: {c['clip']} {c['clip_s']:.1f} s, {c['clip_kernels']} kernels vs "
                     f"{c['noclip']} {c['noclip_s']:.1f} s, {c['noclip_kernels']} kernels: "
                     f"{fmt(c['overhead'] and 100 * c['overhead'], '+.0f')}% time, "
                     f"{c['extra_kernels']:+d} kernels ({'meets' if c['meets_target'] else 'misses'} "
                     f"<= {100 * COMPILE_TARGET:.0f}%)")
    for n, p in res["profile"].items():
        ops = ", ".join(f"{r['op']} {r['self_us']:+.0f} us ({r['calls']:+.0f} calls)"
                        for r in p["clip_ops"][:5])
        lines.append(f"profile {n} - {p['baseline']}: clip ops {p['clip_ops_self_us']:+.0f} us/step "
                     f"({ops or '-'}); all ops {p['all_added_self_us']:+.0f} us/step")
    return lines


def row_lines(res: dict) -> list[str]:
    lines = [" ".join(h.rjust(w) for h, w in COLUMNS)]
    for n, r in res["variants"].items():
        o, q = r.get("overhead"), r.get("ratio")
        cells = [n, fmt(r["median_ms"], ".3f"), fmt(r["iqr_ms"], ".2f"),
                 fmt(o and o["ms"], "+.3f"), ci(*o["ci_ms"], "+.3f") if o else "-",
                 ("yes" if o["resolved"] else "no") if o else "-",
                 fmt(q and q["ratio"], ".2f"), ci(*q["ci"], ".2f") if q else "-",
                 ("yes" if q["resolved"] else "no") if q else "-",
                 (f"{q['target']} {q['verdict']}" if q and q.get("target") else "-")]
        lines.append(" ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS)))
    return lines


def table(name: str, res: dict) -> bool:
    say("\n".join(head_lines(name, res) + row_lines(res)))
    for p in res["problems"]:
        say(f"PROBLEM: {p}")
    return True


# ---------------------------------------------------------------------------------------
# the stamp, outputs
# ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_rev() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "compileclip", "passes", "bench"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp(args, argv) -> dict:
    dev = args.device
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *argv]),
        "torch": torch.__version__, "compileclip": compileclip.__version__,
        "compileclip_path": str(Path(compileclip.__file__).parent),
        "git": git_rev(), "python": platform.python_version(), "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }


def config_of(args) -> dict:
    return {"workloads": args.workloads, "size": {w: args.size[w] for w in args.workloads},
            "variants": {w: [s.name for s in specs] for w, specs in args.specs.items()},
            "reps": args.reps or f"budget {args.time_budget} s", "steps": args.steps, "full": args.full,
            "check_steps": args.check_steps, "stat": args.stat, "boot": args.boot,
            "seed": args.seed, "max_norm": args.max_norm, "quick": args.quick,
            "kernel_profile": args.kernel_profile, "profile_steps": args.profile_steps,
            "optimizer": "Adam(lr=1e-3, foreach=True)", "clip": "clip_grad_norm_(foreach=True), norm_type 2"}


def warning_lines(caught) -> list[str]:
    def short(filename: str) -> str:
        parts = Path(filename).parts
        for anchor in ("site-packages", "main"):
            if anchor in parts:
                return "/".join(parts[parts.index(anchor) + 1:])
        return filename
    return sorted({f"{w.category.__name__}: {w.message} ({short(w.filename)}:{w.lineno})" for w in caught})


def markdown(record: dict) -> str:
    s, c = record["stamp"], record["config"]
    md = [f"# compileclip clip-overhead benchmark: {s['device']} {s['date'][:10]}", "",
          f"- command: `{s['command']}`",
          f"- torch {s['torch']}, compileclip {s['compileclip']} (git {s['git']}), python {s['python']}",
          f"- device: {s['device_name']}, {s['threads']} threads ({s['cpu_count']} CPUs), load "
          f"average at start {', '.join(f'{x:.2f}' for x in s['loadavg_start'])}, at end "
          f"{', '.join(f'{x:.2f}' for x in s['loadavg_end'])}; peak RSS {s['ru_maxrss_MiB']:.0f} MiB",
          f"- interleaved repetitions: {c['reps']}, {c['steps']} steps per block; {c['optimizer']}; "
          f"{c['clip']}; max_norm {c['max_norm']} (the clip is active: checked)",
          f"- overheads: {c['stat']} of the paired differences; 95% CIs from {c['boot']} paired "
          "bootstrap resamples of the repetitions; `ok` = CI narrower than a third of the figure",
          f"- wall time {record['wall_s']:.0f} s (compiler warm-up {record['warm_up_s']:.1f} s)", ""]
    for name, res in record["workloads"].items():
        head = head_lines(name, res)
        md += [f"## {name}", "", *[f"- {ln}" for ln in head if not ln.startswith("profile")], "",
               "```", *row_lines(res), "```", ""]
        for n, p in res["profile"].items():
            md.append(f"Ops `{n}` adds over `{p['baseline']}` (self CPU us per step, calls per step):")
            md += [f"- `{r['op']}` {r['self_us']:+.1f} us, {r['calls']:+.1f} calls"
                   for r in p["clip_ops"] + p["top_added"][:3]]
            md.append("")
    problems = [p for r in record["workloads"].values() for p in r["problems"]]
    md += ["## Problems", ""] + ([f"- {p}" for p in problems] or ["- none seen"])
    md += ["", "## Warnings", ""] + ([f"- `{w}`" for w in record["warnings"]] or ["- none"])
    if record.get("plot"):
        md += ["", f"![overhead ratios]({record['plot']})"]
    sp = record.get("spike")
    if sp:
        md += ["", "## Gradient spike (bench/spike.py)", ""]
        if "error" in sp:
            md.append(f"- failed: {sp['error']}")
        else:
            thr = ", ".join(f"{k}: {fmt(v, '.3g', 'inf')}" for k, v in sp["thresholds_at_spikes"].items())
            md += [f"- GPT size {sp['size']}, {sp['steps']} steps, loss x{sp['factor']:g} at steps "
                   f"{sp['spike_steps']}; max_norm={sp['policy']}",
                   f"- threshold at the spike steps: {thr}; {sp['n_clipped']} steps clipped "
                   f"{sp['clipped_steps']}; suggest_max_norm(0.95) = {sp['suggest_max_norm_0.95']:.3g}; "
                   f"{sp['wall_s']:.0f} s; details in {sp['files']}"]
            if sp.get("plot"):
                md += ["", f"![gradient spike]({sp['plot']})"]
    return "\n".join(md) + "\n"


def write_plot(path: Path, results: dict) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    variants = sorted({v for r in results.values() for v, row in r["variants"].items() if "ratio" in row},
                      key=lambda v: list(results[names[0]]["variants"]).index(v)
                      if v in results[names[0]]["variants"] else 99)
    if not variants:
        return False
    fig, ax = plt.subplots(figsize=(2.5 + 2.2 * len(names), 4))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        xs, ys, lo, hi = [], [], [], []
        for i, w in enumerate(names):
            q = results[w]["variants"].get(v, {}).get("ratio")
            if not q or not math.isfinite(q["ratio"]):
                continue
            top = q["ci"][1] if math.isfinite(q["ci"][1]) else q["ratio"] + 5
            xs.append(i + (j - (len(variants) - 1) / 2) * width)
            ys.append(q["ratio"])
            lo.append(q["ratio"] - q["ci"][0])
            hi.append(top - q["ratio"])
        ax.bar(xs, ys, width, yerr=[lo, hi], label=v, capsize=2)
    for target, style in ((0.6, "--"), (0.3, ":")):
        ax.axhline(target, color="grey", linestyle=style, linewidth=0.8, label=f"target {target}")
    ax.axhline(1, color="black", linewidth=0.5)
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, -1.0), min(hi, 3.0))  # an unresolved CI would hide the rest
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("overhead / eager clip's overhead")
    ax.set_title("clip overhead ratio, 95% paired-bootstrap CI")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(record: dict, out: Path, plot: bool) -> None:
    s = record["stamp"]
    s["loadavg_end"] = os.getloadavg()
    s["ru_maxrss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{s['device']}-{s['date'][:10]}"
    if plot and write_plot(stem.with_suffix(".png"), record["workloads"]):
        record["plot"] = stem.with_suffix(".png").name
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(record))
    say("")
    for w in record["warnings"]:
        say(f"WARNING: {w}")
    say(f"wrote {stem}.json/.md{'/.png' if record.get('plot') else ''} in {record['wall_s']:.0f} s")
    if (record.get("spike") or {}).get("plot"):
        say(f"gradient-spike plot (ZScore): {out / record['spike']['plot']} (summary: {out}/spike_zscore.md)")
