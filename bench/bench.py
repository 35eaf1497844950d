"""Per-step overhead of gradient-norm clipping in compiled training, with and without compileclip.

    python bench/bench.py                                  # quick default: mlp + deep on CPU
    python bench/bench.py --workloads mlp,deep,gpt,lstm --reps 15 --steps 10
    python bench/bench.py --device cuda --size gpt=1

For every workload, eleven variants of the same model (same seed, same weights, each with its
own deep copy and Adam optimizer) train on one fixed batch:

    compiled_noclip        torch.compile(model), no clipping (the floor of the compiled ones)
    eager_noclip           eager model, no clipping
    eager_clip             eager model + eager clip_grad_norm_(foreach=True)   (the reference)
    compiled_eagerclip     torch.compile(model) + eager clip_grad_norm_
    compiled_compiledclip  torch.compile(model) + torch.compile(clip_grad_norm_ wrapper)
    fused                  torch.compile(model, backend=clip_backend(max_norm)), eager opt.step():
                           norm in the backward graph, one _foreach_mul_ at the step
    fallback               torch.compile(model, backend=clip_backend(max_norm, fuse=False)):
                           norm and scale eagerly at the step
    cstep_noclip           torch.compile(model) + torch.compile(opt.step), no clipping
                           (the floor of the three below)
    cstep_eagerclip        torch.compile(model) + eager clip_grad_norm_ + torch.compile(opt.step)
    step_fused             torch.compile(model) + clip.compile_step(opt)
    both                   model and step compiled with the same clip object

Steps: check (the clipping variants must match eager_clip, else exit 1), warm up, then time
interleaved blocks. See bench/README.md for the method and the meaning of each column.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import compileclip
from compileclip import clip_backend

VARIANTS = [
    "compiled_noclip",
    "eager_noclip",
    "eager_clip",
    "compiled_eagerclip",
    "compiled_compiledclip",
    "fused",
    "fallback",
    "cstep_noclip",
    "cstep_eagerclip",
    "step_fused",
    "both",
]
REFERENCE = "eager_clip"            # what the clipping variants must match numerically
OVERHEAD_REF = "compiled_eagerclip"  # the overhead every other overhead is compared with
BASELINE = {  # the no-clip variant of the same compile mode
    "eager_clip": "eager_noclip",
    "compiled_eagerclip": "compiled_noclip",
    "compiled_compiledclip": "compiled_noclip",
    "fused": "compiled_noclip",
    "fallback": "compiled_noclip",
    "cstep_eagerclip": "cstep_noclip",
    "step_fused": "cstep_noclip",
    "both": "cstep_noclip",
}
CLIPPING = list(BASELINE)
ALL_WORKLOADS = ["mlp", "deep", "gpt", "lstm"]
DEFAULT_SIZE = {"mlp": 1.0, "deep": 0.5, "gpt": 1.0, "lstm": 1.0}
RTOL, ATOL = 1e-4, 1e-5
COPY_BYTES = 128 * 2**20  # the large copy that measures memory bandwidth
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="mlp,deep",
                   help=f"comma list from {','.join(ALL_WORKLOADS)} (default mlp,deep)")
    p.add_argument("--size", default="",
                   help="scale of the workloads: one float for all, or name=float,... "
                        f"(defaults {DEFAULT_SIZE})")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block (default 3)")
    p.add_argument("--check-steps", type=int, default=3,
                   help="steps checked against eager_clip before timing (default 3; the "
                        "first backward of `fused` is a probe, later ones fused)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the check")
    p.add_argument("--max-norm", type=float, default=1e-2, help="clip threshold (default 0.01)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for .json/.md/.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in ALL_WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {ALL_WORKLOADS}")
    args.size = parse_sizes(args.size, p)
    if args.check_steps < 2:
        p.error("--check-steps must be >= 2 so that a fused backward is checked")
    return args


def parse_sizes(text: str, parser) -> dict[str, float]:
    sizes = dict(DEFAULT_SIZE)
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
# workloads: each model takes (inputs, targets) and returns the scalar loss
# ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear -> LayerNorm -> ReLU blocks, MSE loss."""

    def __init__(self, width: int, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU())
            for _ in range(depth)
        ])

    def forward(self, x, y):
        return F.mse_loss(self.blocks(x), y)


class DeepMLP(nn.Module):
    """Many small residual tanh layers: 2 parameter tensors per layer."""

    def __init__(self, layers: int, width: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.scale = layers ** -0.5

    def forward(self, x, y):
        for layer in self.layers:
            x = x + self.scale * torch.tanh(layer(x))
        return F.mse_loss(x, y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only transformer with the output head tied to the token embedding."""

    def __init__(self, vocab: int, d: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, max(1, d // 64)) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.tok.weight)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class LSTMLM(nn.Module):
    """Two stacked nn.LSTMCell unrolled in a Python loop over the sequence."""

    def __init__(self, vocab: int, hidden: int, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.cells = nn.ModuleList(nn.LSTMCell(hidden, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.emb(idx)
        state = [(x.new_zeros(B, c.hidden_size), x.new_zeros(B, c.hidden_size)) for c in self.cells]
        outs = []
        for t in range(T):
            h = x[:, t]
            for i, cell in enumerate(self.cells):
                state[i] = cell(h, state[i])
                h = state[i][0]
            outs.append(h)
        logits = self.head(torch.stack(outs, dim=1))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@dataclasses.dataclass
class Workload:
    name: str
    size: float
    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    desc: str


def build_workload(name: str, size: float, device: torch.device) -> Workload:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        width = round64(1024 * size)
        model, batch = MLP(width), (torch.randn(64, width, generator=gen), torch.randn(64, width, generator=gen))
        desc = f"4 x (Linear({width},{width}) -> LayerNorm -> ReLU), batch 64, MSE"
    elif name == "deep":
        layers = max(1, round(256 * size))
        model, batch = DeepMLP(layers), (torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen))
        desc = f"{layers} residual tanh(Linear(64,64)) layers, batch 64, MSE"
    elif name == "gpt":
        d, vocab, seq, layers, bsz = round64(256 * size), 8192, 128, 10, 8
        model = GPT(vocab, d, layers, seq)
        batch = (torch.randint(vocab, (bsz, seq), generator=gen), torch.randint(vocab, (bsz, seq), generator=gen))
        desc = f"GPT d={d} layers={layers} heads={max(1, d // 64)} vocab={vocab}, batch {bsz}x{seq}, tied embedding"
    elif name == "lstm":
        hidden, vocab, seq, bsz = round64(512 * size), 4096, 16, 32
        model = LSTMLM(vocab, hidden)
        batch = (torch.randint(vocab, (bsz, seq), generator=gen), torch.randint(vocab, (bsz, seq), generator=gen))
        desc = f"2 x LSTMCell({hidden}) unrolled over {seq} steps, vocab {vocab}, batch {bsz}"
    else:
        raise ValueError(name)
    batch = tuple(t.to(device) for t in batch)
    return Workload(name, size, model.to(device), batch, desc)


def round64(x: float) -> int:
    return max(64, 64 * round(x / 64))


# ---------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    name: str
    module: nn.Module                      # this variant's copy of the model (uncompiled)
    forward: Callable                      # what a step calls: the module or its compiled form
    opt: torch.optim.Optimizer
    clip: Callable | None = None           # clips .grad after backward; returns the total norm
    backend: compileclip.ClipBackend | None = None
    step: Callable | None = None           # the optimizer step (compiled for cstep_*, step_fused, both)
    times: list = dataclasses.field(default_factory=list)     # seconds per step, one per block
    first_step_s: float = math.nan
    kernels: int | None = None
    graphs: int = 0
    peak_mem: int | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def compiled(self) -> bool:
        return not self.name.startswith("eager")


def clip_grads(params, max_norm):
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def make_variant(name: str, base: nn.Module, max_norm: float) -> Variant:
    module = copy.deepcopy(base)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, foreach=True)
    eager_clip = lambda ps: clip_grads(ps, max_norm)  # noqa: E731
    backend, step = None, opt.step
    if name in ("fused", "fallback", "both"):
        backend = clip_backend(max_norm, fuse=(name != "fallback"))
        forward = torch.compile(module, backend=backend, dynamic=False)
    elif name.startswith("eager"):
        forward = module
    else:
        forward = torch.compile(module, dynamic=False)
    if name in ("step_fused", "both"):
        backend = backend or clip_backend(max_norm)
        step = backend.compile_step(opt, dynamic=False)
    elif name in ("cstep_noclip", "cstep_eagerclip"):
        step = torch.compile(opt.step, dynamic=False)
    clip = {
        "eager_clip": eager_clip,
        "compiled_eagerclip": eager_clip,
        "cstep_eagerclip": eager_clip,
        "compiled_compiledclip": compiled_clip(max_norm),
    }.get(name)
    return Variant(name, module, forward, opt, clip, backend, step)


def compiled_clip(max_norm: float) -> Callable:
    fn = torch.compile(clip_grads, dynamic=False)
    return lambda ps: fn(ps, max_norm)


def train_step(v: Variant, batch) -> torch.Tensor | None:
    """One step; returns the pre-clip total norm (a tensor, no sync) or None."""
    v.opt.zero_grad(set_to_none=True)
    loss = v.forward(*batch)
    loss.backward()
    norm = v.clip(v.params) if v.clip is not None else None
    v.step()
    if v.backend is not None:
        norm = v.backend.total_norm
    return norm


# ---------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_block(fn: Callable, device: torch.device) -> float:
    """Seconds fn takes: perf_counter on CPU, CUDA events (after a synchronize) on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def wall(fn: Callable, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def fresh_compile():
    """Compile for real: no FX graph cache or AOTAutograd cache hits (from disk or from an
    earlier variant), so kernel counts and compile times do not depend on earlier runs."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Progress:
    """tqdm if installed, else a line every 10%."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.total, self.done, self.desc, self.next_pct = total, 0, desc, 10

    def update(self, n: int = 1, note: str = "") -> None:
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
            return
        self.done += n
        if 100 * self.done >= self.next_pct * self.total:
            print(f"  {self.desc}: {100 * self.done // self.total}% {note}", flush=True)
            self.next_pct += 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def say(msg: str) -> None:
    try:
        from tqdm import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# phase 1: compile, check against eager_clip, warm up
# ---------------------------------------------------------------------------------------
class CheckFailed(SystemExit):
    """Exits with status 1 and the message."""


def first_step(v: Variant, batch, device) -> torch.Tensor | None:
    """The first step of a variant: compiles it (with fresh caches), counts its kernels."""
    torch._inductor.metrics.reset()
    graphs = unique_graphs()
    norm = []
    with fresh_compile():
        v.first_step_s = wall(lambda: norm.append(train_step(v, batch)), device)
    v.graphs = unique_graphs() - graphs
    v.kernels = torch._inductor.metrics.generated_kernel_count if v.compiled else None
    return norm[0]


def check_and_warm_up(variants: dict[str, Variant], batch, args, progress) -> dict:
    """Run the check steps of all variants in lockstep with eager_clip; compare the clipped
    gradients, the total norm and the parameters after Adam. Exits 1 on a mismatch."""
    ref = variants[REFERENCE]
    diffs = {name: 0.0 for name in CLIPPING if name != REFERENCE}
    for i in range(args.check_steps):
        ref_norm = train_step(ref, batch)
        if not float(ref_norm) > args.max_norm:
            raise CheckFailed(f"clip not active: eager total norm {float(ref_norm):.4g} <= "
                           f"max_norm {args.max_norm}; lower --max-norm")
        for v in variants.values():
            if v is ref:
                continue
            if i == 0:
                norm = first_step(v, batch, args.device)
                progress.update(1, f"{v.name}: first step {v.first_step_s:.1f}s")
            else:
                norm = train_step(v, batch)
                progress.update(1)
            if v.name in diffs:
                diffs[v.name] = max(diffs[v.name], compare(v, ref, norm, ref_norm, i))
            sync_to(ref, v)
    for _ in range(args.warmup):
        for v in variants.values():
            train_step(v, batch)
        progress.update(len(variants))
    return diffs


@torch.no_grad()
def sync_to(ref: Variant, v: Variant) -> None:
    """Copy the reference's parameters and optimizer state into ``v``, in place (no
    recompile). Each check step then compares one step from the same state: over several
    steps, Adam turns tiny gradient differences (elements whose gradient is near 0, where
    rounding differences are large relative to the gradient) into update differences of
    the order of the learning rate, which no clipping bug is needed to explain."""
    for p, q in zip(v.module.parameters(), ref.module.parameters()):
        p.copy_(q)
    for p, q in zip(v.module.parameters(), ref.module.parameters()):
        for key, val in ref.opt.state.get(q, {}).items():
            mine = v.opt.state[p].get(key)
            if isinstance(val, torch.Tensor) and isinstance(mine, torch.Tensor):
                mine.copy_(val)


def compare(v: Variant, ref: Variant, norm, ref_norm, step: int) -> float:
    """assert_close on .grad (clipped), the total norm and the parameters; returns the
    largest absolute parameter difference."""
    where = f"{v.name} vs {REFERENCE} at check step {step}"
    try:
        grads = [p.grad for p in v.params]
        torch.testing.assert_close(grads, [p.grad for p in ref.params], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"clipped grads of {where}: {m}")
        if norm is not None:
            torch.testing.assert_close(norm.float(), ref_norm.float(), rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"total norm of {where}: {m}")
        torch.testing.assert_close(v.params, ref.params, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"parameters of {where}: {m}")
    except AssertionError as e:
        raise CheckFailed(f"\nMISMATCH: {e}\n") from None
    with torch.no_grad():
        return max(float((a - b).abs().max()) for a, b in zip(v.params, ref.params))


# ---------------------------------------------------------------------------------------
# phase 2: interleaved timing, with the floor measured in the same rotation
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Floor:
    grads: list[torch.Tensor]
    src: torch.Tensor
    dst: torch.Tensor
    norm_times: list = dataclasses.field(default_factory=list)
    copy_times: list = dataclasses.field(default_factory=list)

    @property
    def grad_bytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grads)


def make_floor(v: Variant, device) -> Floor:
    grads = [p.grad for p in v.params if p.grad is not None]
    src = torch.randn(COPY_BYTES // 4, device=device)
    return Floor(grads, src, torch.empty_like(src))


def time_rotation(variants: dict[str, Variant], floor: Floor, batch, args, progress) -> None:
    """R repetitions of: for each variant a block of k steps; then the floor's blocks.
    Each block follows one untimed step of the same variant, so that no block starts with
    the caches of the block before it (the floor's 128 MiB copy would slow the first)."""
    k, device = args.steps, args.device
    for r in range(args.reps):
        for v in variants.values():
            train_step(v, batch)
            base = reset_peak(device)
            t = time_block(lambda: [train_step(v, batch) for _ in range(k)], device)
            v.times.append(t / k)
            v.peak_mem = max_peak(device, base, v.peak_mem)
            progress.update(k + 1)
        floor.norm_times.append(time_block(lambda: [torch._foreach_norm(floor.grads) for _ in range(k)], device) / k)
        floor.copy_times.append(time_block(lambda: [floor.dst.copy_(floor.src) for _ in range(k)], device) / k)


def reset_peak(device) -> int:
    """CUDA: resets the peak; returns what is allocated before the block (all variants'
    weights, optimizer states and last gradients)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def max_peak(device, base: int, prev):
    """CUDA: the largest peak above the allocation at the start of the block, in bytes."""
    if device.type != "cuda":
        return None
    return max(prev or 0, torch.cuda.max_memory_allocated() - base)


def busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (/proc/stat; 0 where unavailable)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in r)


@contextlib.contextmanager
def other_load(result: dict):
    """Sets result['cores'] to how many cores other processes kept busy, on average, while
    the block ran: a measure of how contended the timings are."""
    busy, own, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    yield
    wall_s = time.perf_counter() - t0
    other = (busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)
    result["cores"] = max(0.0, other / wall_s) if busy else None
    result["wall_s"] = wall_s


@contextlib.contextmanager
def gc_paused():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------
# one workload, end to end
# ---------------------------------------------------------------------------------------
def run_workload(name: str, args) -> dict:
    wl = build_workload(name, args.size[name], args.device)
    nparams = sum(p.numel() for p in wl.model.parameters())
    ntensors = len(list(wl.model.parameters()))
    say(f"\n== {name}: {wl.desc}; {nparams / 1e6:.2f}M params in {ntensors} tensors")
    variants = {n: make_variant(n, wl.model, args.max_norm) for n in VARIANTS}
    n_steps = len(VARIANTS) * (args.check_steps + args.warmup) - args.check_steps \
        + len(VARIANTS) * args.reps * (args.steps + 1)
    progress = Progress(n_steps, name)
    t0 = time.perf_counter()
    diffs = check_and_warm_up(variants, wl.batch, args, progress)
    check_s = time.perf_counter() - t0
    say(f"   check passed (max |param - eager_clip| after {args.check_steps} steps: "
        + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()) + f"); compile+check {check_s:.0f}s")
    floor = make_floor(variants["eager_noclip"], args.device)
    graphs_before, load = unique_graphs(), {}
    with gc_paused(), other_load(load):
        time_rotation(variants, floor, wl.batch, args, progress)
    progress.close()
    recompiles = unique_graphs() - graphs_before
    res = summarize(wl, nparams, ntensors, variants, floor, diffs, recompiles)
    res.update(compile_and_check_s=check_s, timing_s=load["wall_s"],
               other_processes_cores=load["cores"])
    return res


def summarize(wl, nparams, ntensors, variants, floor, diffs, recompiles) -> dict:
    med = {n: float(np.median(v.times)) for n, v in variants.items()}
    floor_norm = float(np.median(floor.norm_times))
    bandwidth = 2 * COPY_BYTES / float(np.median(floor.copy_times))  # read + write
    floor_bw = floor.grad_bytes / bandwidth
    rows = {}
    for n, v in variants.items():
        rows[n] = row = step_stats(v.times)
        row.update(compile_s=v.first_step_s - med[n], first_step_s=v.first_step_s,
                   kernels=v.kernels, graphs=v.graphs, peak_mem_bytes=v.peak_mem,
                   clip_stats=v.backend.stats if v.backend else None)
        if n in BASELINE:
            paired = np.array(v.times) - np.array(variants[BASELINE[n]].times)
            q1, q3 = np.percentile(paired, [25, 75])
            row.update(overhead_ms=1e3 * (med[n] - med[BASELINE[n]]), overhead_iqr_ms=1e3 * (q3 - q1),
                       overhead_x_floor=(med[n] - med[BASELINE[n]]) / floor_norm,
                       overhead_x_bw_floor=(med[n] - med[BASELINE[n]]) / floor_bw)
    ref_ovh = rows[OVERHEAD_REF]["overhead_ms"]
    for n in BASELINE:
        # a ratio to a reference overhead lost in the noise (<= 0) means nothing
        rows[n]["ratio_to_" + OVERHEAD_REF] = rows[n]["overhead_ms"] / ref_ovh if ref_ovh > 0 else None
    kern = rows["fused"]["kernels"], rows["compiled_noclip"]["kernels"]
    return {
        "desc": wl.desc, "size": wl.size, "params": nparams, "tensors": ntensors,
        "check": {"max_abs_param_diff": diffs, "rtol": RTOL, "atol": ATOL},
        "floor": {"grad_bytes": floor.grad_bytes, "foreach_norm_ms": 1e3 * floor_norm,
                  "copy_bytes": COPY_BYTES, "copy_bandwidth_GBps": bandwidth / 1e9,
                  "bandwidth_read_ms": 1e3 * floor_bw,
                  "foreach_norm_times_ms": [1e3 * t for t in floor.norm_times]},
        "kernels_added_by_fused_clip": kern[0] - kern[1] if None not in kern else None,
        "recompiles_during_timing": recompiles,
        "variants": rows,
    }


def step_stats(times: list[float]) -> dict:
    a = 1e3 * np.array(times)
    q1, q3 = np.percentile(a, [25, 75])
    return {"median_ms": float(np.median(a)), "min_ms": float(a.min()), "max_ms": float(a.max()),
            "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "times_ms": [float(t) for t in a]}


def clearly_slower(a: list[float], b: list[float]) -> bool:
    """a slower than b in over 3/4 of the (paired, interleaved) repetitions."""
    return float(np.percentile(np.array(a) - np.array(b), 25)) > 0


def problems_of(name: str, res: dict) -> list[str]:
    """Things worth a look (not assertions: timings are reported whatever they are)."""
    out = []
    v = res["variants"]
    fused = v["fused"]["clip_stats"]
    if fused.get("norm_at_step", 0):
        out.append(f"{name}: fused variant computed norms at the step: {fused}")
    if v["fallback"]["clip_stats"].get("norm_from_backward", 0):
        out.append(f"{name}: fallback (fuse=False) used backward norms: {v['fallback']['clip_stats']}")
    if (res["other_processes_cores"] or 0) > 0.2:
        out.append(f"{name}: timings contended: other processes kept "
                   f"{res['other_processes_cores']:.2f} cores busy during timing")
    if res["recompiles_during_timing"]:
        out.append(f"{name}: {res['recompiles_during_timing']} Dynamo graphs compiled during timing")
    for other in ("fallback", OVERHEAD_REF):
        if clearly_slower(v["fused"]["times_ms"], v[other]["times_ms"]):
            out.append(f"{name}: fused is slower than {other} in most repetitions: overhead "
                       f"{v['fused']['overhead_ms']:.3f} ms vs {v[other]['overhead_ms']:.3f} ms")
    for n in ("fused", "fallback"):
        if v[n]["graphs"] > v["compiled_noclip"]["graphs"]:
            out.append(f"{name}: {n} compiled {v[n]['graphs']} Dynamo graphs, compiled_noclip "
                       f"{v['compiled_noclip']['graphs']}")
    return out


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------
def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table_lines(name: str, res: dict) -> list[str]:
    f = res["floor"]
    lines = [
        f"{name}: {res['desc']} ({res['params'] / 1e6:.2f}M params, {res['tensors']} tensors, "
        f"{f['grad_bytes'] / 2**20:.1f} MiB of grads)",
        f"  compile+check {res['compile_and_check_s']:.0f} s, timing {res['timing_s']:.0f} s; "
        f"other processes kept {fmt(res['other_processes_cores'], '.2f', '?')} of "
        f"{os.cpu_count()} cores busy during timing",
        f"  floor: foreach_norm over the grads {f['foreach_norm_ms']:.3f} ms; copy bandwidth "
        f"{f['copy_bandwidth_GBps']:.1f} GB/s -> one read of the grads {f['bandwidth_read_ms']:.3f} ms",
        f"  kernels the fused clip adds: {fmt(res['kernels_added_by_fused_clip'], 'd')} "
        f"(fused {res['variants']['fused']['kernels']} vs compiled_noclip "
        f"{res['variants']['compiled_noclip']['kernels']})",
    ]
    with_mem = any(r["peak_mem_bytes"] for r in res["variants"].values())
    columns = COLUMNS + [MEM_COLUMN] if with_mem else COLUMNS
    lines.append("  " + " ".join(h.rjust(w) for h, w in columns))
    for n, r in res["variants"].items():
        cells = [n, fmt(r["median_ms"], ".3f"), fmt(r["min_ms"], ".3f"), fmt(r["max_ms"], ".3f"),
                 fmt(r["iqr_ms"], ".3f"), fmt(r.get("overhead_ms"), "+.3f"),
                 fmt(r.get("overhead_iqr_ms"), ".3f"), fmt(r.get("ratio_to_" + OVERHEAD_REF), ".2f"),
                 fmt(r.get("overhead_x_floor"), ".2f"),
                 fmt(None if n.startswith("eager") else r["compile_s"], ".1f"),
                 fmt(r["kernels"], "d")]
        if with_mem:
            cells.append(fmt(r["peak_mem_bytes"] and r["peak_mem_bytes"] / 2**20, ".0f"))
        lines.append("  " + " ".join(c.rjust(w) for c, (_, w) in zip(cells, columns)))
    return lines


COLUMNS = [("variant", 22), ("med ms", 9), ("min", 9), ("max", 9), ("IQR", 7), ("ovh ms", 9),
           ("ovh IQR", 8), ("/c_eager", 8), ("/floor", 7), ("compile s", 9), ("kernels", 7)]
MEM_COLUMN = ("step peak MiB", 13)  # CUDA only


def stamp(args, argv) -> dict:
    dev = args.device
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *argv]),
        "torch": torch.__version__,
        "compileclip": compileclip.__version__,
        "git": git_rev(),
        "python": platform.python_version(),
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }


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
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "compileclip", "passes"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config_of(args) -> dict:
    return {"workloads": args.workloads, "size": {w: args.size[w] for w in args.workloads},
            "reps": args.reps, "steps": args.steps, "check_steps": args.check_steps,
            "warmup": args.warmup, "max_norm": args.max_norm, "optimizer": "Adam(lr=1e-3, foreach=True)",
            "clip": "clip_grad_norm_(foreach=True), norm_type 2"}


def write_markdown(path: Path, record: dict, tables: dict[str, list[str]]) -> None:
    s, c = record["stamp"], record["config"]
    md = [
        f"# compileclip clip-overhead benchmark: {s['device']} {s['date'][:10]}", "",
        f"- command: `{s['command']}`",
        f"- torch {s['torch']}, compileclip {s['compileclip']} (git {s['git']}), python {s['python']}",
        f"- device: {s['device_name']}, {s['threads']} threads ({s['cpu_count']} CPUs), "
        f"load average at start {', '.join(f'{x:.2f}' for x in s['loadavg_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in s['loadavg_end'])}",
        f"- peak RSS of the process: {s['ru_maxrss_MiB']:.0f} MiB",
        f"- {c['reps']} interleaved repetitions x {c['steps']} steps per block; {c['optimizer']}; "
        f"{c['clip']}; max_norm {c['max_norm']} (the clip is active: asserted)",
        f"- all clipping variants matched eager_clip after {c['check_steps']} steps "
        f"(rtol {RTOL}, atol {ATOL})",
        f"- wall time of the run: {record['wall_s']:.0f} s", "",
        "Columns: per-step median / min / max / IQR over the repetitions; `ovh` = median minus "
        "the median of the no-clip variant of the same compile mode, `ovh IQR` = IQR of the "
        "per-repetition paired differences; `/c_eager` = overhead / compiled_eagerclip's "
        "overhead; `/floor` = overhead / time of `torch._foreach_norm` over the grads; "
        "`compile s` = first step minus a median step (0 where Dynamo reused an earlier "
        "variant's graph); `kernels` = Inductor kernels generated by the variant's first step.", "",
    ]
    for name, lines in tables.items():
        head, rows = lines[1:4], lines[4:]
        md += [f"## {name}", "", lines[0], "", *["- " + ln.strip() for ln in head], "",
               "```", *[ln[2:] for ln in rows], "```", ""]
    md += ["## Problems", ""] + ([f"- {p}" for p in record["problems"]] or ["- none seen"])
    md += ["", "## Warnings", ""] + ([f"- `{w}`" for w in record["warnings"]] or ["- none"])
    if record.get("plot"):
        md += ["", f"![overhead]({record['plot']})"]
    path.write_text("\n".join(md) + "\n")


def write_plot(path: Path, results: dict) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(names), 4))
    width = 0.8 / len(CLIPPING)
    for j, variant in enumerate(CLIPPING):
        ys = [results[w]["variants"][variant]["overhead_ms"] for w in names]
        errs = [results[w]["variants"][variant]["overhead_iqr_ms"] / 2 for w in names]
        ax.bar(np.arange(len(names)) + (j - (len(CLIPPING) - 1) / 2) * width, ys, width,
               yerr=errs, label=variant, capsize=2)
    ax.set_xticks(np.arange(len(names)), names)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("clip overhead per step (ms)")
    ax.set_title("clip overhead vs no-clip step of the same compile mode (error bar: IQR/2)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available in this torch build/machine")
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    record = {"stamp": stamp(args, ["bench/bench.py", *argv]), "config": config_of(args)}
    say(f"torch {torch.__version__} on {record['stamp']['device_name']}, "
        f"{record['stamp']['threads']} threads; max_norm {args.max_norm}; "
        f"{args.reps} reps x {args.steps} steps")
    results, tables, problems = {}, {}, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for name in args.workloads:
            results[name] = res = run_workload(name, args)
            tables[name] = table_lines(name, res)
            problems += problems_of(name, res)
            say("\n".join(tables[name]))
    record["stamp"]["loadavg_end"] = os.getloadavg()
    record["stamp"]["ru_maxrss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record.update(workloads=results, problems=problems,
                  warnings=sorted({f"{w.category.__name__}: {w.message} ({short_path(w.filename)}:{w.lineno})"
                                   for w in caught}),
                  wall_s=time.perf_counter() - t0)
    write_outputs(record, tables, Path(args.out), args)
    return 0


def short_path(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "main"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return filename


def write_outputs(record: dict, tables, out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{record['stamp']['device']}-{record['stamp']['date'][:10]}"
    if not args.no_plot and write_plot(stem.with_suffix(".png"), record["workloads"]):
        record["plot"] = stem.with_suffix(".png").name
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(stem.with_suffix(".md"), record, tables)
    print()
    for p in record["problems"]:
        print(f"PROBLEM: {p}")
    for w in record["warnings"]:
        print(f"WARNING: {w}")
    print(f"wrote {stem}.json/.md{'/.png' if record.get('plot') else ''} "
          f"in {record['wall_s']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
