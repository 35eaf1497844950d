"""One rank of the DDP communication-hook runs of ``test_ddp_hook.py`` (gloo, 2 processes).

Each case trains a DDP model compiled with the clip and the same DDP model run eagerly with
``clip_grad_norm_(model.parameters(), max_norm)`` right before ``opt.step()``, on random data that
differs per rank and step, with the clip active and inactive. After every step it compares the
parameters, the ``.grad`` the optimizer consumed and the total norm, bit for bit (the model is
compiled with ``aot_eager``: the same kernels as eager), and checks where the step took the
norms from: the clip's DDP hook (no norm pass at the step: no ``_foreach_norm`` or
``linalg_vector_norm`` of a gradient in the step's profile) or, where the hook cannot be used,
the step.
"""

from __future__ import annotations

import copy
import datetime
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn

WORLD = 2
STEPS = 4
ACTIVE, INACTIVE = 0.05, 1e6

# name: settings. hook: "clip" (installed by the clip), "composed" (the user's hook through
# clip.comm_hook), "foreign" (a user's hook of its own: the step norms); accumulate: micro-batches
# per step, the first ones under no_sync(); used: "hook" or "step" (where the norms came from)
CASES = {
    "ddp_hook": dict(hook="clip", used="hook"),
    "ddp_hook_linf": dict(hook="clip", used="hook", norm_type=math.inf),
    "ddp_hook_bucket_view": dict(hook="clip", used="hook", ddp=dict(gradient_as_bucket_view=True)),
    "ddp_hook_no_sync": dict(hook="clip", used="hook", accumulate=2),
    "ddp_hook_accumulate_synced": dict(hook="clip", used="hook", accumulate=2, no_sync=False),
    "ddp_hook_unused": dict(hook="clip", used="hook", unused=True, ddp=dict(find_unused_parameters=True)),
    "ddp_hook_composed": dict(hook="composed", used="hook"),
    "ddp_hook_foreign": dict(hook="foreign", used="step"),
    "ddp_hook_edited": dict(hook="clip", used="step", edit=True),  # .grad written after backward
    "ddp_hook_step": dict(hook="clip", used="hook", compile_step=True, tol="close"),
    "ddp_hook_static_graph": dict(hook="clip", used="hook", ddp=dict(static_graph=True)),
    # a GradScaler attached to the clip: the hook's norms are of the unscaled gradients
    "ddp_hook_grad_scaler": dict(hook="clip", used="hook", amp=True),
    # a sweep: an earlier clip compiled the same DDP module, ran a step and is gone
    "ddp_hook_sweep": dict(hook="clip", used="hook", sweep=True),
}


class Net(nn.Module):
    def __init__(self, width: int = 512, depth: int = 4, unused: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 4)
        self.spare = nn.Linear(width, 4) if unused else None  # never called

    def forward(self, x):
        for lin in self.layers:
            x = torch.relu(lin(x))
        return self.head(x)


def batch(rank: int, step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7000 + 100 * rank + 10 * step + micro)
    return torch.randn(8, 512, generator=g)


def make_ddp(base, case, clip=None):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    # 1 MiB buckets (DDPOptimizer's least) over 1 MiB layers: several buckets
    model = DDP(copy.deepcopy(base), bucket_cap_mb=1, **case.get("ddp", {}))
    if case["hook"] == "composed":
        model.register_comm_hook(None, default_hooks.allreduce_hook if clip is None
                                 else clip.comm_hook(default_hooks.allreduce_hook))
    elif case["hook"] == "foreign":
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    return model


def train_micro(model, run, case, rank, step, scaler=None) -> None:
    n = case.get("accumulate", 1)
    for micro in range(n):
        last = micro == n - 1
        ctx = model.no_sync() if not last and case.get("no_sync", True) else _null()
        with ctx:
            loss = (run(batch(rank, step, micro)) - 1).pow(2).mean()
            (loss if scaler is None else scaler.scale(loss)).backward()
    if case.get("edit"):
        for p in model.parameters():
            p.grad.mul_(0.5)


def _earlier_run(model, rank) -> None:
    """A step of another clip over ``model`` that changes nothing (lr=0), then that clip is gone."""
    import gc

    from compileclip import clip_backend

    earlier = clip_backend(max_norm=1.0, inner="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    (torch.compile(model, backend=earlier)(batch(rank, 99, 0)) - 1).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert earlier.stats.get("ddp_hook") == 1, earlier.stats
    earlier.remove()
    del earlier, opt
    gc.collect()
    torch._dynamo.reset()


def _scaler(case):
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if case.get("amp") else None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def reference(base, case, rank, max_norm):
    model = make_ddp(base, case)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snaps = []
    scaler = _scaler(case)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        train_micro(model, model, case, rank, step, scaler)
        if scaler is not None:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, case.get("norm_type", 2.0))
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        assert (float(norm) > max_norm) == (max_norm == ACTIVE), (float(norm), max_norm)
        snaps.append(dict(norm=norm.clone(), params=[p.detach().clone() for p in model.parameters()],
                          grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()]))
    return snaps


def compiled(base, case, rank, max_norm, snaps) -> list[str]:
    from compileclip import clip_backend

    scaler = _scaler(case)
    clip = clip_backend(max_norm=max_norm, norm_type=case.get("norm_type", 2.0), inner="aot_eager", scaler=scaler)
    model = make_ddp(base, case, clip)
    if case.get("sweep"):
        _earlier_run(model, rank)
    run = torch.compile(model, backend=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = clip.compile_step(opt) if case.get("compile_step") else opt.step
    if scaler is not None:
        def step():
            scaler.step(opt)
            scaler.update()
    same = (lambda a, b: torch.equal(a, b)) if case.get("tol") != "close" else (
        lambda a, b: torch.allclose(a, b, rtol=1.3e-6, atol=1e-5 * max(1.0, float(b.abs().max()))))
    bad = []
    for i, snap in enumerate(snaps):
        opt.zero_grad(set_to_none=True)
        train_micro(model, run, case, rank, i, scaler)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        norm_ops = [e.key for e in prof.key_averages() if e.key in ("aten::_foreach_norm", "aten::norm")]
        tag = f"[{case['name']} rank {rank} max_norm={max_norm} step {i}]"
        for k, (p, want_p, want_g) in enumerate(zip(model.parameters(), snap["params"], snap["grads"])):
            if (p.grad is None) != (want_g is None) or (want_g is not None and not same(p.grad, want_g)):
                bad.append(f"{tag} .grad of parameter {k} differs from eager's")
            if not same(p.detach(), want_p):
                bad.append(f"{tag} parameter {k} differs from eager's")
        if not same(clip.total_norm, snap["norm"]):
            bad.append(f"{tag} total_norm {float(clip.total_norm)!r}, eager {float(snap['norm'])!r}")
        if case["used"] == "hook" and norm_ops and not case.get("compile_step"):
            bad.append(f"{tag} the step normed the gradients ({norm_ops}) although DDP's hook had")
    stats = clip.stats
    if case["used"] == "hook" and stats.get("norm_at_step", 0):
        bad.append(f"[{case['name']}] the step normed {stats['norm_at_step']} time(s), the hook's norms unused: {stats}")
    if case["used"] == "step" and stats.get("norm_from_backward", 0):
        bad.append(f"[{case['name']}] the step used the hook's norms where they were not the final .grad's: {stats}")
    return bad


def main(rank: int, port: int, name: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        case = {**CASES[name], "name": name}
        torch.manual_seed(0)
        base = Net(unused=case.get("unused", False))
        bad = []
        for max_norm in (ACTIVE, INACTIVE):
            snaps = reference(base, case, rank, max_norm)
            torch._dynamo.reset()
            bad += compiled(base, case, rank, max_norm, snaps)
        dist.barrier()
        if bad:
            raise AssertionError(f"{len(bad)} mismatch(es) on rank {rank}:\n" + "\n".join(bad[:12]))
    finally:
        dist.destroy_process_group()
