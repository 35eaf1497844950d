"""The variants, as a table: how the model is compiled, how the step is compiled, which clip
runs, which no-clip variant its overhead is measured against, and which eager-clip variant's
overhead that is divided by.

Variants that differ only in the clip call share one model copy, one optimizer and one compiled
step (``shares``): ``compiled_eagerclip`` is ``compiled_noclip``'s training state plus an eager
``clip_grad_norm_`` call, ``cstep_eagerclip`` is ``cstep_noclip``'s plus the same call. The code
each one times differs exactly by the clip, and sharing saves compiling Adam over 512 tensors
twice. Every variant with a compileclip backend has its own clip object, model copy and
optimizer (a clip binds to the optimizers it steps).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable

import torch
import torch.nn as nn

from compileclip import clip_backend


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    model: str            # eager | inductor | clip (clip_backend) | clip_nofuse (fuse=False)
    step: str             # eager | compiled (torch.compile(opt.step)) | clip (clip.compile_step),
                          # clip_nowb (the same with step_writes_grad=False)
    clip: str             # none | eager (clip_grad_norm_) | compiled (torch.compile of it) | backend
    baseline: str | None  # the no-clip variant of the same compile mode
    reference: str | None  # overhead / reference's overhead is the ratio the issue targets
    target: float | None  # the target for that ratio
    shares: str | None    # reuse this variant's model copy, optimizer and step
    default: bool         # in the default set
    doc: str
    checks_grad: bool = True  # the .grad after the step must equal eager's clipped .grad
    optim: str = "adam"  # adam: Adam(foreach=True); adam_fused: Adam(fused=True)


SPECS = [
    Spec("eager_clip", "eager", "eager", "eager", "eager_noclip", None, None, None, True,
         "eager model + clip_grad_norm_(foreach=True): the numerical reference (checked "
         "against, timed only with --all)"),
    Spec("eager_noclip", "eager", "eager", "none", None, None, None, "eager_clip", False,
         "eager model, no clipping"),
    Spec("compiled_noclip", "inductor", "eager", "none", None, None, None, None, True,
         "torch.compile(model), eager opt.step(), no clipping"),
    Spec("compiled_eagerclip", "inductor", "eager", "eager", "compiled_noclip", None, None,
         "compiled_noclip", True,
         "torch.compile(model) + eager clip_grad_norm_: the reference of `fused`"),
    Spec("compiled_compiledclip", "inductor", "eager", "compiled", "compiled_noclip",
         "compiled_eagerclip", None, "compiled_noclip", False,
         "torch.compile(model) + torch.compile(clip_grad_norm_ wrapper)"),
    Spec("fused", "clip", "eager", "backend", "compiled_noclip", "compiled_eagerclip", 0.6, None,
         True, "torch.compile(model, backend=clip), eager opt.step(): norm in the backward "
         "graph, one _foreach_mul_ at the step"),
    Spec("fallback", "clip_nofuse", "eager", "backend", "compiled_noclip", "compiled_eagerclip",
         None, None, False,
         "torch.compile(model, backend=clip_backend(fuse=False)): norm and scale eagerly at the step"),
    Spec("cstep_noclip", "inductor", "compiled", "none", None, None, None, None, True,
         "torch.compile(model) + torch.compile(opt.step), no clipping"),
    Spec("cstep_eagerclip", "inductor", "compiled", "eager", "cstep_noclip", None, None,
         "cstep_noclip", True,
         "torch.compile(model) + eager clip_grad_norm_ + torch.compile(opt.step): the reference "
         "of the two below"),
    Spec("step_fused", "inductor", "clip", "backend", "cstep_noclip", "cstep_eagerclip", 0.3,
         None, True, "torch.compile(model) + clip.compile_step(opt): clip in the compiled step"),
    Spec("step_fused_nowb", "inductor", "clip_nowb", "backend", "cstep_noclip", "cstep_eagerclip",
         None, None, False, "step_fused with step_writes_grad=False: .grad is left unclipped "
         "(the .grad check is skipped; parameters and norm are checked)", checks_grad=False),
    Spec("both", "clip", "clip", "backend", "cstep_noclip", "cstep_eagerclip", 0.3, None, True,
         "model and step compiled with one clip object: norm in the backward, scale in the step"),
    Spec("fused_noclip", "inductor", "eager", "none", None, None, None, None, True,
         "torch.compile(model), eager Adam(fused=True) step, no clipping", optim="adam_fused"),
    Spec("fused_eagerclip", "inductor", "eager", "eager", "fused_noclip", None, None, "fused_noclip", True,
         "torch.compile(model) + eager clip_grad_norm_ + Adam(fused=True): the reference of `fold`",
         optim="adam_fused"),
    Spec("fold", "clip", "eager", "backend", "fused_noclip", "fused_eagerclip", 0.6, None, True,
         "torch.compile(model, backend=clip), eager Adam(fused=True) step: norm in the backward, "
         "the coefficient in the fused kernel (opt.grad_scale), no scale pass", optim="adam_fused"),
]
BY_NAME = {s.name: s for s in SPECS}
REFERENCE = "eager_clip"  # what every clipping variant must match numerically
STEP_COMPILED = {"cstep_noclip", "cstep_eagerclip", "step_fused", "step_fused_nowb", "both"}
# Without --full, these workloads leave out the compiled-step variants, to keep `make bench`
# near 5 minutes on a 2-core CPU: compiling Adam's step over deep's 512 tensors takes ~180 s
# per variant there (compileclip turns Inductor's caches off for its own compiles, so nothing
# is reused), and a gpt step takes ~1 s.
MODEL_ONLY_BY_DEFAULT = {"deep", "gpt"}


def select(names: list[str] | None, all_: bool = False, workload: str | None = None,
           full: bool = False) -> list[Spec]:
    """The specs to run: the given names (plus what they need), else the default set (for
    ``workload``: without ``full``, no compiled-step variants on MODEL_ONLY_BY_DEFAULT)."""
    if names is None:
        want = {s.name for s in SPECS if s.default or all_}
        if workload in MODEL_ONLY_BY_DEFAULT and not (full or all_):
            want -= STEP_COMPILED
    else:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(BY_NAME)}")
        want = set(names) | {REFERENCE}
    changed = True
    while changed:  # close over baselines, references and shared owners
        changed = False
        for n in list(want):
            s = BY_NAME[n]
            # the reference is checked against, not timed: its baseline only when asked for
            deps = (s.reference, s.shares) if n == REFERENCE else (s.baseline, s.reference, s.shares)
            for dep in deps:
                if dep and dep not in want:
                    want.add(dep)
                    changed = True
    return [s for s in SPECS if s.name in want]


def clip_grads(params, max_norm):
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


@dataclasses.dataclass
class Variant:
    spec: Spec
    module: nn.Module                  # this variant's (possibly shared) copy of the model
    forward: Callable                  # the module or its compiled form
    opt: torch.optim.Optimizer
    step: Callable                     # opt.step, or its compiled form
    clip: Callable | None = None       # clips .grad after backward, returns the total norm
    backend: object | None = None      # the compileclip clip object

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def clips(self) -> bool:
        return self.spec.clip != "none"


def build(specs: list[Spec], base: nn.Module, max_norm: float) -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    for s in specs:
        if s.shares:
            owner = out[s.shares]
            v = Variant(s, owner.module, owner.forward, owner.opt, owner.step)
        else:
            v = _own(s, base, max_norm)
        if s.clip == "eager":
            v.clip = lambda ps: clip_grads(ps, max_norm)  # noqa: E731
        elif s.clip == "compiled":
            fn = torch.compile(clip_grads, dynamic=False)
            v.clip = lambda ps: fn(ps, max_norm)  # noqa: E731
        out[s.name] = v
    return out


def _own(s: Spec, base: nn.Module, max_norm: float) -> Variant:
    module = copy.deepcopy(base)
    kind = {"adam": dict(foreach=True), "adam_fused": dict(fused=True)}[s.optim]
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, **kind)
    backend = None
    if s.model in ("clip", "clip_nofuse"):
        backend = clip_backend(max_norm, fuse=(s.model == "clip"))
        forward = torch.compile(module, backend=backend, dynamic=False)
    elif s.model == "inductor":
        forward = torch.compile(module, dynamic=False)
    else:
        forward = module
    if s.step in ("clip", "clip_nowb"):
        backend = backend or clip_backend(max_norm, step_writes_grad=(s.step == "clip"))
        step = backend.compile_step(opt, dynamic=False)
    elif s.step == "compiled":
        step = torch.compile(opt.step, dynamic=False)
    else:
        step = opt.step
    return Variant(s, module, forward, opt, step, backend=backend)


def train_step(v: Variant, batch, phases: list | None = None) -> torch.Tensor | None:
    """One step: zero_grad, forward+loss, backward, clip, step. Returns the pre-clip total
    norm (a tensor, no sync) or None. With ``phases`` (a list), appends the wall seconds of
    forward+backward and of clip+step (CPU; for the compile phase only)."""
    v.opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    v.forward(*batch).backward()
    t1 = time.perf_counter()
    norm = v.clip(v.params) if v.clip is not None else None
    v.step()
    if phases is not None:
        phases.append((t1 - t0, time.perf_counter() - t1))
    if v.backend is not None and v.spec.clip == "backend":
        norm = v.backend.total_norm
    return norm
