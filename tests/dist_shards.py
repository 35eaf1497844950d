"""One rank of the DTensor bitwise runs of ``test_distributed.py``: the clip over FSDP2, HSDP and
tensor-parallel gradients against eager ``clip_grad_norm_`` on the same DTensors, bit for bit.

The control is plain ``torch.compile(model, backend="aot_eager")`` + eager
``clip_grad_norm_(model.parameters())`` + ``opt.step()``; the clip's copy is the same model
compiled with ``clip_backend(inner="aot_eager")`` and an eager ``opt.step()``. Their forward
and backward are the same aten ops, so every difference would be the clip's: ``.grad`` after
the step (the local shard), the parameters and ``clip.total_norm`` are compared with
``torch.equal``, for 3 steps, clip active and inactive. The run also says which path the clip
took: the local shards (``stats["norm_local_shards"]``) or torch's DTensor one.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from dist_worker import ACTIVE, INACTIVE, STEPS, WORLD, Net, batch, full, local, loss_fn

# name: mesh shape, wrapper ("fsdp" per block and whole, "tp" Megatron MLP pairs), settings;
# local: whether the clip takes the local-shard path (else torch's DTensor path)
CASES = {
    "shards_fsdp_l2": dict(mesh=(WORLD,), wrapper="fsdp", local=True),
    "shards_fsdp_linf": dict(mesh=(WORLD,), wrapper="fsdp", norm_type=math.inf, local=True),
    "shards_fsdp_l3": dict(mesh=(WORLD,), wrapper="fsdp", norm_type=3.0, local=True),
    "shards_fsdp_mixed_precision": dict(mesh=(WORLD,), wrapper="fsdp", mp=True, local=True),
    "shards_hsdp": dict(mesh=(1, WORLD), wrapper="fsdp", local=True),
    "shards_tp": dict(mesh=(WORLD,), wrapper="tp", local=False),  # replicated biases: torch's path
    "shards_tp_colwise": dict(mesh=(WORLD,), wrapper="tp_colwise", local=True),
    # clip.compile_step(opt) against torch.compile(opt.step) + eager clip_grad_norm_, through
    # Inductor: the step graph's norm of the local shards' norms must be ATen's arithmetic
    # (Inductor's own x ** 0.5 and vector_norm differ in the last bit), over 8 steps
    "shards_fsdp_compiled_step": dict(mesh=(WORLD,), wrapper="fsdp", local=True, step=True, steps=8,
                                      inner="inductor"),
}


def wrap(model: nn.Module, case: dict, mesh) -> nn.Module:
    if case["wrapper"] == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {}
        if case.get("mp"):
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh, **kw)
        fully_shard(model, mesh=mesh, **kw)
        return model
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if case["wrapper"] == "tp_colwise":  # every linear sharded on its output: all Shard(0)
        plan = {f"blocks.{i}.lin": ColwiseParallel(use_local_output=False) for i in range(len(model.blocks))}
    else:  # pairs: colwise (Shard(0)), rowwise (weight Shard(1), bias Replicate)
        plan = {f"blocks.{i}.lin": ColwiseParallel() if i % 2 == 0 else RowwiseParallel() for i in range(len(model.blocks))}
    plan["head"] = ColwiseParallel(output_layouts=Replicate())
    return parallelize_module(model, mesh, plan)


def train(model: nn.Module, run, case: dict, rank: int, max_norm: float, clip) -> list[dict]:
    norm_type = case.get("norm_type", 2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step = opt.step
    if case.get("step"):
        step = clip.compile_step(opt) if clip is not None else torch.compile(opt.step)
    snaps = []
    for i in range(case.get("steps", STEPS)):
        opt.zero_grad(set_to_none=True)
        x = batch(0 if case["wrapper"].startswith("tp") else rank, i, 16)  # TP: the same batch on each rank
        out = run(x)
        loss_fn(full(out) if hasattr(out, "placements") else out).backward()
        if clip is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
        step()
        if clip is not None:
            norm = clip.total_norm
        snaps.append(dict(norm=full(norm).detach().clone(),
                          params={n: local(p).detach().clone() for n, p in model.named_parameters()},
                          grads={n: local(p.grad).clone() for n, p in model.named_parameters()}))
    return snaps


def compare(ours: list[dict], ref: list[dict], where: str, max_norm: float) -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (float(b["norm"]) > max_norm) == (max_norm == ACTIVE), (float(b["norm"]), max_norm)
        assert torch.equal(a["norm"], b["norm"]), f"{where} step {i}: total_norm {a['norm']} != eager {b['norm']}"
        for kind in ("grads", "params"):
            for n, t in b[kind].items():
                assert torch.equal(a[kind][n], t), (
                    f"{where} step {i}: {kind} {n}: max diff {(a[kind][n].float() - t.float()).abs().max()}")


def main(rank: int, port: int, name: str) -> None:
    """Entry point for torch.multiprocessing.spawn."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from compileclip import clip_backend

        case = CASES[name]
        names = ("replicate", "shard") if len(case["mesh"]) == 2 else None  # HSDP wants them named
        mesh = init_device_mesh("cpu", case["mesh"], mesh_dim_names=names)
        torch.manual_seed(0)
        base = Net(16)
        for max_norm in (ACTIVE, INACTIVE):
            torch._dynamo.reset()
            model = wrap(copy.deepcopy(base), case, mesh)
            inner = case.get("inner", "aot_eager")
            ref = train(model, torch.compile(model, backend=inner), case, rank, max_norm, None)
            torch._dynamo.reset()
            clip = clip_backend(max_norm=max_norm, norm_type=case.get("norm_type", 2.0), inner=inner)
            model = wrap(copy.deepcopy(base), case, mesh)
            ours = train(model, torch.compile(model, backend=clip), case, rank, max_norm, clip)
            where = f"[{name} rank {rank} max_norm={max_norm}]"
            compare(ours, ref, where, max_norm)
            used = clip.stats.get("norm_local_shards", 0) + clip.stats.get("step_in_graph", 0)
            assert (used == case.get("steps", STEPS)) if case["local"] else used == 0, f"{where} stats {dict(clip.stats)}"
            del clip
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _under_aten(event) -> bool:
    p = event.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return True
        p = p.cpu_parent
    return False


@contextlib.contextmanager
def _one_thread_mesh(rank: int, port: int):
    """The process group of this rank (one thread) and a 1-D CPU mesh over the ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    try:
        yield init_device_mesh("cpu", (WORLD,))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main_ops(rank: int, port: int, name: str) -> None:
    """What the clip adds to an FSDP2 step is a constant number of ops on plain tensors (the
    local shards), none on DTensors: ``opt.step()`` (SGD, foreach) of a model compiled with the
    clip against the same step of a model compiled without it, 4, 32, 128 and 512 blocks (10 to 1026
    sharded gradients), counted by a dispatch mode (the ops called at the top level, by name
    and by whether a DTensor is among their arguments) and by the profiler (which also sees
    the ops that return their input, such as ``.to`` a tensor's own device)."""
    from torch.distributed.tensor import DTensor
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(("DTensor " if DTensor in types else "") + func.__name__)
            return func(*args, **(kwargs or {}))

    from collections import Counter

    from torch.distributed.fsdp import fully_shard

    from compileclip import clip_backend

    with _one_thread_mesh(rank, port) as mesh:
        added = {}
        for depth in (4, 32, 128, 512):
            counts = []
            for backend in ("aot_eager", clip_backend(max_norm=ACTIVE, inner="aot_eager")):
                torch._dynamo.reset()
                torch.manual_seed(0)
                model = Net(16, depth)
                fully_shard(model, mesh=mesh)
                run = torch.compile(model, backend=backend)
                opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
                for i in range(2):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(run(batch(rank, i, 16))).backward()
                    with Count() as c, profile(activities=[ProfilerActivity.CPU]) as prof:
                        opt.step()
                # the profiler also sees what the dispatch mode does not: ops that return their
                # input (``.to`` a tensor's own device), each still a dispatch on the host
                top = [e.name for e in prof.events() if e.name.startswith("aten::") and not _under_aten(e)]
                counts.append(Counter(c.names) + Counter(top))
            clip = backend
            assert clip.stats["norm_local_shards"] == 2, dict(clip.stats)
            clip.remove()
            added[2 * depth + 2] = counts[1] - counts[0]
            assert not counts[0] - counts[1], counts  # nothing the plain step does is missing
        first = next(iter(added.values()))
        assert all(v == first for v in added.values()), added
        assert not [n for n in first if n.startswith("DTensor")], first


def main_step_kernels(rank: int, port: int, name: str) -> None:
    """A compiled step over FSDP2's DTensor gradients (``clip.compile_step(opt)``) has a
    constant number of kernels more than a plain ``torch.compile(opt.step)``: the norm through
    the local shards (one ``grad_norms`` call, one all-reduce), not one reduction per gradient
    (measured: +1 loop nest and +6 extern calls at 6 and 18 gradients, the arithmetic after the
    all-reduce being ATen's, as opaque calls; before the local shards: +9 and +21 loop nests).
    Counted as Inductor generates them on CPU, loop nests and extern calls
    (``test_constant_kernels.py``); SGD over 6 and 18 sharded gradients, with the exactness of
    the same step checked in ``fsdp_step`` and ``shards_fsdp_compiled_step``."""
    import re

    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    extern = re.compile(r"\bextern_kernels\.\w+\(|\btorch\.ops\.\w+\.\w+\.\w+\(")
    from torch.distributed.fsdp import fully_shard

    from compileclip import clip_backend

    with _one_thread_mesh(rank, port) as mesh:
        added = {}
        for depth in (2, 8):
            counts = []
            for clipped in (False, True):
                torch._dynamo.reset()
                torch.manual_seed(0)
                model = Net(16, depth)
                for blk in model.blocks:
                    fully_shard(blk, mesh=mesh)
                fully_shard(model, mesh=mesh)
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
                clip = clip_backend(max_norm=ACTIVE) if clipped else None
                step = clip.compile_step(opt) if clipped else torch.compile(opt.step)
                loss_fn(model(batch(rank, 0, 16))).backward()
                metrics.reset()
                with torch._inductor.config.patch(fx_graph_cache=False), \
                        torch._functorch.config.patch(enable_autograd_cache=False):
                    _, sources = run_and_get_code(step)
                counts.append((metrics.generated_kernel_count, sum(len(extern.findall(s)) for s in sources)))
                if clip is not None:  # (the first call clips at the pre-hook: the graph runs disabled)
                    clip.remove()
            added[2 * depth + 2] = (counts[1][0] - counts[0][0], counts[1][1] - counts[0][1])
        assert len(set(added.values())) == 1, added
        print(f"rank {rank}: (loop nests, extern calls) the clip adds to the compiled step: {added}")
