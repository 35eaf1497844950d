"""FSDP2 on 2 gloo ranks: what the clip at the optimizer step costs, against eager
``clip_grad_norm_`` on the same DTensor gradients.

A model of ``--layers`` residual ``Linear(w, w)`` blocks (2 sharded gradients each), each block
and the root ``fully_shard``-ed over a 1-D CPU mesh; ``SGD(lr=0)``. Four variants of the step,
interleaved in random order (the same on both ranks), ``--reps`` repetitions of ``--steps``
steps after one backward (each step re-clips the same gradients: the work does not depend on
their values):

- ``noclip``: ``opt.step()`` of a plain ``torch.compile``-d copy;
- ``eager``: ``clip_grad_norm_(model.parameters(), max_norm)`` + ``opt.step()`` on that copy;
- ``clip``: ``opt.step()`` of a copy compiled with ``clip_backend`` (the clip runs in the
  step's pre-hook: the local shards' norm, one all-reduce, the scale of the local shards).
- ``floor``: the least any clip at this step does, written out on the plain copy: one
  ``_foreach_norm`` of the local shards, one all-reduce of the per-gradient norms, one
  ``_foreach_mul_`` of the local shards, then ``opt.step()``. Its ratio is the best a clip can
  reach here (the all-reduce's latency on gloo is most of it).

Printed (rank 0): per-step medians, the clip's overhead over ``noclip`` as a multiple of eager's
overhead with a 95% paired-bootstrap CI (``timing.ratio_ci``); the aten ops each clip runs
(profiler) and the bytes it allocates (the profiler's CPU memory events: no full or replicated
copy of a gradient would show as the gradients' size).

    .venv/bin/python bench/fsdp_clip.py [--layers 64,128] [--width 64] [--reps 15] [--steps 5]
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


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x.pow(2).mean()


def build(layers: int, width: int, mesh, backend):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net(layers, width)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    run = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(16, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    run(x).backward()
    return run, opt  # the clip holds what it compiled weakly: the caller keeps the model


def ops_and_bytes(fn) -> tuple[int, int]:
    """aten ops run by ``fn`` and the bytes they allocated (profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if not any(p.name.startswith("aten::") for p in _parents(e))]
    allocated = sum(max(e.cpu_memory_usage, 0) for e in events if e.cpu_memory_usage > 0)
    return len(top), int(allocated)


def _parents(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def run_rank(rank: int, port: int, args, out: str) -> None:
    ranks.init(rank, port)
    from torch.distributed.device_mesh import init_device_mesh

    from compileclip import clip_backend

    mesh = init_device_mesh("cpu", (ranks.WORLD,))
    results = []
    for layers in args.layers:
        torch._dynamo.reset()
        plain, plain_opt = build(layers, args.width, mesh, "aot_eager")
        torch._dynamo.reset()  # the plain copy is not called again
        clip = clip_backend(max_norm=MAX_NORM, inner="aot_eager")
        clipped, clip_opt = build(layers, args.width, mesh, clip)
        params = list(plain._orig_mod.parameters())

        def eager():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            plain_opt.step()

        one = torch.ones(())

        def floor():
            # the least a clip at this step does: one norm of the local shards, one all-reduce
            # of the per-gradient norms, one scale of the local shards (SGD is not fused)
            local = [p.grad._local_tensor for p in params]
            norms = torch.stack(torch._foreach_norm(local, 2.0))
            dist.all_reduce(norms)
            torch._foreach_mul_(local, one)
            plain_opt.step()

        steps = {"noclip": plain_opt.step, "eager": eager, "clip": clip_opt.step, "floor": floor}
        for fn in steps.values():
            fn()
        times = timing.interleaved(steps, args.reps, args.steps, torch.device("cpu"), seed=0)
        ratio = timing.ratio_ci(times["clip"], times["noclip"], times["eager"], times["noclip"], target=0.3)
        floor_ratio = timing.ratio_ci(times["floor"], times["noclip"], times["eager"], times["noclip"])
        eager_ops = ops_and_bytes(lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM))
        clip_ops = ops_and_bytes(clip_opt.step)
        step_ops = ops_and_bytes(plain_opt.step)
        grad_bytes = sum(p.grad._local_tensor.numel() * p.grad.element_size() for p in params)
        assert clip.stats.get("norm_local_shards"), dict(clip.stats)  # the clip ran, on the local shards
        results.append(dict(
            layers=layers, gradients=len(params), local_grad_bytes=grad_bytes,
            median_ms=ranks.medians_ms(times),
            ratio=ratio, floor_ratio=floor_ratio, stats=dict(clip.stats),
            eager_clip_ops=eager_ops[0], eager_clip_alloc_bytes=eager_ops[1],
            clip_step_ops_minus_step=clip_ops[0] - step_ops[0], clip_step_alloc_minus_step=clip_ops[1] - step_ops[1]))
        clip.remove()
        dist.barrier()
    ranks.finish(rank, results, out)


def main() -> None:
    args = ranks.arguments(__doc__, layers=[64, 128], width=64, steps=5)
    results = ranks.spawn(run_rank, args, "fsdp_clip")
    lines = [f"FSDP2, {ranks.machine()}; "
             f"Linear({args.width},{args.width}) blocks, SGD(lr=0); {args.reps} reps x {args.steps} steps, medians",
             "", "| gradients | step, no clip | eager clip + step | clip at the step | clip / eager overhead [95% CI] | "
             "floor / eager overhead | aten ops: eager clip / clip | bytes allocated: eager clip / clip | local gradients |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        m, q = r["median_ms"], r["ratio"]
        lines.append(f"| {r['gradients']} | {m['noclip']:.2f} ms | {m['eager']:.2f} ms | {m['clip']:.2f} ms | "
                     f"{q['ratio']:.2f}x [{q['ci'][0]:.2f}, {q['ci'][1]:.2f}] | {r['floor_ratio']['ratio']:.2f}x | "
                     f"{r['eager_clip_ops']} / "
                     f"{r['clip_step_ops_minus_step']} | {r['eager_clip_alloc_bytes']} / {r['clip_step_alloc_minus_step']} | "
                     f"{r['local_grad_bytes']} B |")
    ranks.write("\n".join(lines), results, args.out, "fsdp_clip")


if __name__ == "__main__":
    main()
