"""The floor of a clip on this CPU, per workload: one read of all gradients (a sum over one
flat buffer of the same size), against the norm of the real gradient shapes (_foreach_norm,
what both eager and compileclip run), the scale (_foreach_mul_) and eager clip_grad_norm_.
Median of interleaved repetitions, microseconds.

    .venv/bin/python bench/floor.py > bench/results/issue9/floor.txt
"""
import statistics, sys, time
import torch
sys.path.insert(0, "bench")
from workloads import build
torch.set_num_threads(2)
out = [f"torch {torch.__version__}, 2 threads; median us of 40 interleaved repetitions"]
for name in ("mlp", "deep", "gpt"):
    wl = build(name, 1.0, torch.device("cpu"))
    params = [p for p in wl.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    flat = torch.randn(sum(g.numel() for g in grads))
    fns = {
        "one read (flat sum)": lambda: flat.sum(),
        "_foreach_norm": lambda: torch._foreach_norm(grads, 2.0),
        "_foreach_mul_": lambda: torch._foreach_mul_(grads, 1.0),
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
    }
    ts = {k: [] for k in fns}
    for _ in range(5):
        for f in fns.values():
            f()
    for _ in range(40):
        for k, f in fns.items():
            t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
    mb = flat.numel() * 4 / 2**20
    read = statistics.median(ts["one read (flat sum)"])
    out.append(f"{name}: {len(grads)} tensors, {mb:.1f} MiB; " + ", ".join(
        f"{k} {statistics.median(v) * 1e6:.0f}" for k, v in ts.items()) + f"; read bandwidth {mb / 1024 / read:.1f} GiB/s")
print("\n".join(out))
