"""A gradient spike under the adaptive ZScore policy (ZClip): the monitoring API end to end.

    .venv/bin/python bench/spike.py --out DIR                  # standalone (~1-2 min on 2 CPU cores)
    .venv/bin/python bench/bench.py                            # runs it after the workloads (--no-spike: not)

Trains the bench's GPT workload (``workloads.build("gpt", size)``; default size 0.5, d=128, to
keep the run short on a CPU) compiled with ``torch.compile(model, backend=clip)`` and an eager
``AdamW.step()`` (``clip.compile_step`` is left out on purpose: compiling Adam's step over the
124 tensors takes minutes on a 2-core CPU). Every step draws a fresh batch (seeded): sequences
that follow a fixed random permutation of the vocabulary (token t+1 = perm[token t]), so the
loss can fall and the norms have a trend. At the spike steps the loss is multiplied by
``--factor`` before ``backward()``: every gradient is that many times larger, as when a bad
batch hits. The clip is ``clip_backend(max_norm=ZScore(warmup=...), history=N,
per_param_norms=True)`` with N >= the number of steps, so the history covers the whole run.

Writes to ``--out`` (the folder bench.py writes to):

    spike_zscore.png   clip.plot: norm per step, ZScore threshold, clipped steps, suggest_max_norm(0.95)
    spike_zscore.json  steps, spike steps, the threshold at each spike, clipped steps,
                       suggest_max_norm(0.95), top-5 parameters by gradient norm at each spike
                       step (clip.named_norms), wall times
    spike_zscore.md    the same as a short report
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402
import workloads as W  # noqa: E402

from compileclip import ZScore, clip_backend  # noqa: E402

DEFAULT_SIZE = 0.5
DEFAULT_STEPS = 72
DEFAULT_SPIKES = "30,50-52"  # one isolated spike and a burst of three
DEFAULT_FACTOR = 50.0
DEFAULT_WARMUP = 15
STEM = "spike_zscore"
# A demo, not a timing: one thread. On the 2-core CPU a second busy process stalls torch's
# 2-thread OpenMP regions (measured: a size-0.5 GPT step 0.4 s with 1 thread, ~5 s with 2,
# AdamW's step alone 0.012 s vs 1.4-2.7 s); on a quiet machine 1 thread costs little here.
DEFAULT_THREADS = 1


def parse_spikes(text: str) -> list[int]:
    """'30,50-52' -> [30, 50, 51, 52] (optimizer steps, counted from 1)."""
    steps: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        lo, _, hi = item.partition("-")
        steps.update(range(int(lo), int(hi or lo) + 1))
    return sorted(steps)


def events(spikes: list[int]) -> list[list[int]]:
    """Consecutive spike steps grouped: [[30], [50, 51, 52]]."""
    out: list[list[int]] = []
    for s in spikes:
        if out and out[-1][-1] == s - 1:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def batches(vocab: int, bsz: int, seq: int, seed: int, device):
    """Fresh (idx, targets) per call: random start tokens, then token t+1 = perm[token t]."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=gen)
    while True:
        x = torch.empty(bsz, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(vocab, (bsz,), generator=gen)
        for t in range(seq):
            x[:, t + 1] = perm[x[:, t]]
        yield x[:, :-1].to(device), x[:, 1:].to(device)


def train(compiled, opt, clip, data, steps, spikes, factor, device, losses, at_spike) -> float:
    """The training loop; returns the time (perf_counter) at the end of step 2 (compiled)."""
    t_compiled = time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = compiled(*next(data))
        (loss * factor if step in spikes else loss).backward()
        opt.step()  # the clip runs here (eager AdamW step, clip from the backward's norm)
        losses.append(loss.detach())
        if step in spikes:  # named_norms is the last step's: read it now (a few host reads)
            named = {n: float(v) for n, v in clip.named_norms(compiled).items()}
            top = sorted(named.items(), key=lambda kv: -kv[1])[:5]
            grads = [p.grad for p in opt.param_groups[0]["params"] if p.grad is not None]
            at_spike[step] = {"total_norm": float(clip.total_norm), "threshold": float(clip.threshold),
                              "top5": [{"param": n, "grad_norm": v} for n, v in top],
                              "params_with_norms": len(named),
                              # checks: the parts add up to the total; .grad as AdamW consumed it
                              # (left clipped after the step) has the threshold's norm
                              "sqrt_sum_sq_named": math.sqrt(sum(v * v for v in named.values())),
                              "grad_norm_after_clip": float(torch.nn.utils.get_total_norm(grads))}
        if step == 2:
            timing.sync(device)
            t_compiled = time.perf_counter()
    return t_compiled


def run(out_dir: Path, *, size: float = DEFAULT_SIZE, steps: int = DEFAULT_STEPS,
        spikes: list[int] | None = None, factor: float = DEFAULT_FACTOR,
        warmup: int = DEFAULT_WARMUP, z: float = 2.5, lr: float = 1e-3, seed: int = 0,
        device="cpu", threads: int | None = DEFAULT_THREADS, log=print) -> dict:
    """The run; torch's thread count is ``threads`` during it (None: left as it is) and
    restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, size=size, steps=steps, spikes=spikes, factor=factor, warmup=warmup, z=z,
                    lr=lr, seed=seed, device=device, log=log)
    finally:
        torch.set_num_threads(before)


def _run(out_dir: Path, *, size, steps, spikes, factor, warmup, z, lr, seed, device, log) -> dict:
    device = torch.device(device)
    spikes = parse_spikes(DEFAULT_SPIKES) if spikes is None else spikes
    if any(s < 1 or s > steps for s in spikes):
        raise ValueError(f"spike steps {spikes} must lie in 1..{steps}")
    if any(s <= warmup for s in spikes):
        raise ValueError(f"spike steps {spikes} must come after the warm-up ({warmup} steps)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    torch._dynamo.reset()
    wl = W.build("gpt", size, device)
    model = wl.model
    policy = ZScore(z=z, warmup=warmup)
    clip = clip_backend(max_norm=policy, history=steps, per_param_norms=True)
    compiled = torch.compile(model, backend=clip, dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
    vocab = model.tok.num_embeddings
    bsz, seq = wl.batch[0].shape
    data = batches(vocab, bsz, seq, seed + 1, device)
    log(f"spike: {wl.desc} (size {size}: {wl.params / 1e6:.2f}M params, {wl.tensors} tensors); "
        f"{torch.get_num_threads()} thread(s); {steps} steps, loss x{factor:g} at steps {spikes}; max_norm={policy}")

    losses, at_spike, load = [], {}, {}
    with timing.other_load(load):
        t_compiled = train(compiled, opt, clip, data, steps, spikes, factor, device, losses, at_spike)
        timing.sync(device)
        t_end = time.perf_counter()

    hist = clip.history.float().cpu()
    thrs = clip.thresholds.float().cpu()
    assert hist.numel() == steps, (hist.numel(), steps)
    clipped = torch.isfinite(hist) & (hist > thrs)  # as clip.plot marks them
    clipped_steps = [i + 1 for i in torch.nonzero(clipped).flatten().tolist()]
    suggest = clip.suggest_max_norm(0.95)
    plot = out_dir / f"{STEM}.png"
    plot_error = None
    try:
        clip.plot(plot, title=f"GPT d={model.tok.embedding_dim} (bench gpt size {size}), loss x{factor:g} at steps "
                              f"{spans(spikes)}\nmax_norm=ZScore(z={z}, warmup={warmup}), eager AdamW")
    except ImportError as e:  # matplotlib is the optional extra
        plot_error, plot = str(e), None

    def thr(i):
        v = float(thrs[i - 1])
        return None if math.isinf(v) else v

    normal = [float(hist[i]) for i in range(warmup, steps) if (i + 1) not in spikes]
    summary = {
        "workload": wl.desc, "size": size, "params": wl.params, "tensors": wl.tensors,
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "steps": steps, "spike_steps": spikes, "spike_events": events(spikes), "factor": factor,
        "policy": repr(policy), "history": steps, "per_param_norms": True,
        "optimizer": f"AdamW(lr={lr}, foreach=True), eager step; model compiled with backend=clip",
        "batches": f"fresh per step, seed {seed + 1}: random start tokens, token t+1 = perm[token t]",
        "spikes": [{"step": s, "event": next(i for i, e in enumerate(events(spikes)) if s in e),
                    "pre_clip_norm": float(hist[s - 1]), "threshold": thr(s),
                    "clipped": bool(clipped[s - 1]),
                    "post_clip_norm": min(float(hist[s - 1]), thr(s) or math.inf),
                    **{k: at_spike[s][k] for k in ("top5", "params_with_norms", "sqrt_sum_sq_named",
                                                   "grad_norm_after_clip")}}
                   for s in spikes],
        "clipped_steps": clipped_steps, "n_clipped": len(clipped_steps),
        "n_clipped_outside_spikes": len([s for s in clipped_steps if s not in spikes]),
        "normal_norm_after_warmup": {"median": float(torch.tensor(normal).median()),
                                     "q95": float(torch.quantile(torch.tensor(normal), 0.95)),
                                     "max": max(normal)} if normal else None,
        "suggest_max_norm_0.95": suggest,
        "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        "norms": [round(float(x), 5) for x in hist],
        "thresholds": [None if math.isinf(float(x)) else round(float(x), 5) for x in thrs],
        "wall_s": {"total": t_end - t_start, "first_two_steps_incl_compile": t_compiled - t_start,
                   "after_compile": t_end - t_compiled,
                   "per_step_after_compile": (t_end - t_compiled) / max(1, steps - 2),
                   "other_processes_cores": load.get("other_cores")},
        "plot": plot.name if plot else None, "plot_error": plot_error,
        "command": "python bench/spike.py " + " ".join(sys.argv[1:]) if __name__ == "__main__" else None,
    }
    (out_dir / f"{STEM}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / f"{STEM}.md").write_text(markdown(summary))
    s0 = summary["spikes"]
    log(f"spike: {len(clipped_steps)} of {steps} steps clipped ({summary['n_clipped_outside_spikes']} "
        f"outside the spikes); at the spikes norm -> threshold "
        + ", ".join(f"{s['step']}: {s['pre_clip_norm']:.3g} -> {fmt(s['threshold'])}" for s in s0)
        + f"; suggest_max_norm(0.95) = {suggest:.3g}; {summary['wall_s']['after_compile']:.1f} s after "
        f"compile ({summary['wall_s']['first_two_steps_incl_compile']:.1f} s for the first two steps; other "
        f"processes kept {cores(load.get('other_cores'))} cores busy)")
    log(f"spike: plot at {plot}" if plot else f"spike: no plot ({plot_error})")
    return summary


def spans(spikes: list[int]) -> str:
    return ", ".join(str(e[0]) if len(e) == 1 else f"{e[0]}-{e[-1]}" for e in events(spikes))


def cores(x) -> str:
    return "?" if x is None else f"{x:.2f}"


def fmt(x, spec: str = ".3g") -> str:
    return "inf (no clip)" if x is None else format(x, spec)


def markdown(s: dict) -> str:
    w = s["wall_s"]
    md = [f"# Gradient spike under {s['policy']}", "",
          f"- workload: {s['workload']}, bench size {s['size']} ({s['params'] / 1e6:.2f}M params, "
          f"{s['tensors']} tensors); {s['device']}, {s['threads']} thread(s), torch {s['torch']}",
          f"- {s['optimizer']}; batches: {s['batches']}",
          f"- {s['steps']} steps; loss x{s['factor']:g} at steps {s['spike_steps']}; "
          f"clip_backend(max_norm={s['policy']}, history={s['history']}, per_param_norms=True)",
          f"- loss {s['loss_first']:.3f} at step 1, {s['loss_last']:.3f} at step {s['steps']}",
          f"- wall time {w['total']:.1f} s: first two steps (compile) {w['first_two_steps_incl_compile']:.1f} s, "
          f"then {w['after_compile']:.1f} s ({1e3 * w['per_step_after_compile']:.0f} ms per step); other "
          f"processes kept {cores(w['other_processes_cores'])} cores busy", ""]
    if s["normal_norm_after_warmup"]:
        nn = s["normal_norm_after_warmup"]
        md += [f"Steps after the warm-up without a spike: median norm {nn['median']:.3g}, 95th percentile "
               f"{nn['q95']:.3g}, max {nn['max']:.3g}.", ""]
    md += ["| step | pre-clip norm | ZScore threshold | clipped | post-clip norm | `.grad` after the step | "
           "`named_norms` combined |", "|---:|---:|---:|:---:|---:|---:|---:|"]
    md += [f"| {r['step']} | {r['pre_clip_norm']:.4g} | {fmt(r['threshold'], '.4g')} | "
           f"{'yes' if r['clipped'] else 'no'} | {r['post_clip_norm']:.4g} | {r['grad_norm_after_clip']:.4g} | "
           f"{r['sqrt_sum_sq_named']:.4g} |" for r in s["spikes"]]
    md += ["", "(`.grad` after the step: the norm of the gradients AdamW consumed, measured; "
           "`named_norms` combined: sqrt of the sum of squares of `clip.named_norms`, which should "
           "be the pre-clip norm)"]
    md += ["", f"- clipped steps: {s['n_clipped']} of {s['steps']}: {s['clipped_steps']} "
           f"({s['n_clipped_outside_spikes']} outside the spike steps)",
           f"- `clip.suggest_max_norm(0.95)` = {s['suggest_max_norm_0.95']:.4g} (over the whole history, "
           "spikes included)", ""]
    for r in s["spikes"]:
        md.append(f"Top-5 gradients by norm at step {r['step']} (`clip.named_norms`, "
                  f"{r['params_with_norms']} parameters): "
                  + ", ".join(f"`{t['param']}` {t['grad_norm']:.3g}" for t in r["top5"]))
        md.append("")
    if s["plot"]:
        md += [f"![norm history]({s['plot']})", ""]
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="directory for spike_zscore.{png,json,md} (default bench/results)")
    p.add_argument("--size", type=float, default=DEFAULT_SIZE,
                   help=f"GPT scale (default {DEFAULT_SIZE}: d=128; 1 is bench.py's d=256)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"default {DEFAULT_STEPS}")
    p.add_argument("--spikes", default=DEFAULT_SPIKES,
                   help=f"spike steps, e.g. '30,50-52' (default {DEFAULT_SPIKES}: one spike and a burst)")
    p.add_argument("--factor", type=float, default=DEFAULT_FACTOR, help="loss multiplier at a spike")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="ZScore warm-up steps")
    p.add_argument("--z", type=float, default=2.5, help="ZScore z threshold")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch threads during the run (default {DEFAULT_THREADS}; 0: torch's default)")
    args = p.parse_args(argv)
    try:
        run(Path(args.out), size=args.size, steps=args.steps, spikes=parse_spikes(args.spikes),
            factor=args.factor, warmup=args.warmup, z=args.z, lr=args.lr, seed=args.seed,
            device=args.device, threads=args.threads or None)
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
