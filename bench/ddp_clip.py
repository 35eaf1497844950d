"""DDP on 2 gloo ranks: the whole training step with the clip, against eager ``clip_grad_norm_``.

A model of ``--layers`` ``Linear(w, w)`` layers under DistributedDataParallel (1 MiB buckets),
compiled (``aot_eager``), ``SGD(lr=0)``. Three copies train, interleaved in random order (the
same on both ranks), ``--reps`` repetitions of ``--steps`` steps (zero_grad, forward, backward,
step):

- ``noclip``: a plain ``torch.compile``-d copy;
- ``eager``: the same with ``clip_grad_norm_(model.parameters(), max_norm)`` before the step;
- ``clip``: compiled with ``clip_backend``: the norm of each averaged gradient is taken in DDP's
  communication hook after its bucket's all-reduce; the step stacks them and scales;
- ``noclip_pyhook``: ``noclip`` with torch's own Python ``allreduce_hook`` registered: what a
  Python communication hook costs by itself against DDP's C++ default (the clip's hook is one).

Printed (rank 0): medians per step, the clip's overhead over ``noclip`` as a multiple of eager's
(95% paired-bootstrap CI), and the norm kernels each clip runs after the backward (profiler:
``_foreach_norm``/``norm`` calls; eager runs one ``_foreach_norm`` per device and dtype over
every gradient, the clip none).

    .venv/bin/python bench/ddp_clip.py [--layers 16,64] [--width 256] [--reps 15] [--steps 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ranks  # noqa: E402
import timing  # noqa: E402

MAX_NORM = 1e-2
NORM_OPS = ("aten::_foreach_norm", "aten::norm", "aten::linalg_vector_norm")


class Net(nn.Module):
    """Not nn.Sequential: Dynamo leaves a torch.nn module's forward called by DDP uncompiled."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return x


def build(layers: int, width: int, backend, python_hook: bool = False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(Net(layers, width), bucket_cap_mb=1)
    if python_hook:  # torch's own Python allreduce hook: what any Python comm hook costs
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.allreduce_hook)
    run = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(16, width, generator=torch.Generator().manual_seed(dist.get_rank()))

    def backward():
        opt.zero_grad(set_to_none=True)
        run(x).pow(2).mean().backward()

    def step(clip_eagerly: bool = False):
        backward()
        if clip_eagerly:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()

    step()
    return model, opt, backward, step


def norm_calls(fn) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key in NORM_OPS}


def run_rank(rank: int, port: int, args, out: str) -> None:
    ranks.init(rank, port)
    from compileclip import clip_backend

    results = []
    for layers in args.layers:
        torch._dynamo.reset()
        clip = clip_backend(max_norm=MAX_NORM, inner="aot_eager")
        _, clip_opt, clip_backward, clipped = build(layers, args.width, clip)
        _, _, _, plain = build(layers, args.width, "aot_eager")
        _, _, _, pyhook = build(layers, args.width, "aot_eager", python_hook=True)
        eager_model, _, _, eager = build(layers, args.width, "aot_eager")
        steps = {"noclip": plain, "eager": lambda: eager(True), "clip": clipped, "noclip_pyhook": pyhook}
        times = timing.interleaved(steps, args.reps, args.steps, torch.device("cpu"), seed=0)
        ratio = timing.ratio_ci(times["clip"], times["noclip"], times["eager"], times["noclip"])
        hook_share = timing.ratio_ci(times["noclip_pyhook"], times["noclip"], times["clip"], times["noclip"])
        eager_norms = norm_calls(lambda: torch.nn.utils.clip_grad_norm_(eager_model.parameters(), MAX_NORM))
        clip_backward()  # a fresh backward, then the step alone under the profiler
        clip_norms = norm_calls(clip_opt.step)
        stats = dict(clip.stats)
        assert stats.get("ddp_hook") and not stats.get("norm_at_step"), stats  # the hook's norms were used
        results.append(dict(layers=layers, gradients=2 * layers,
                            median_ms=ranks.medians_ms(times),
                            ratio=ratio, hook_share=hook_share, stats=stats, eager_norm_calls=eager_norms, clip_step_norm_calls=clip_norms))
        clip.remove()
        dist.barrier()
    ranks.finish(rank, results, out)


def main() -> None:
    args = ranks.arguments(__doc__, layers=[16, 64], width=256, steps=3)
    results = ranks.spawn(run_rank, args, "ddp_clip")
    lines = [f"DDP, {ranks.machine()}; "
             f"Linear({args.width},{args.width}) layers, 1 MiB buckets, SGD(lr=0); whole steps (forward, backward, step); "
             f"{args.reps} reps x {args.steps} steps, medians",
             "", "| gradients | no clip | eager clip | clip (DDP hook) | clip / eager overhead [95% CI] | "
             "no clip, torch's Python allreduce_hook | its share of the clip's overhead [95% CI] | "
             "norm calls after the backward: eager / clip's step |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        m, q = r["median_ms"], r["ratio"]
        lines.append(f"| {r['gradients']} | {m['noclip']:.2f} ms | {m['eager']:.2f} ms | {m['clip']:.2f} ms | "
                     f"{q['ratio']:.2f}x [{q['ci'][0]:.2f}, {q['ci'][1]:.2f}] | {m['noclip_pyhook']:.2f} ms | "
                     f"{r['hook_share']['ratio']:.2f} [{r['hook_share']['ci'][0]:.2f}, {r['hook_share']['ci'][1]:.2f}] | {r['eager_norm_calls']} / "
                     f"{r['clip_step_norm_calls'] or 'none'} |")
    ranks.write("\n".join(lines), results, args.out, "ddp_clip")


if __name__ == "__main__":
    main()
