"""Clipping fused into the compiled optimizer step: ``torch.compile(opt.step, backend=clip)``.

Golden outputs against eager ``clip_grad_norm_(params, max_norm); opt.step()`` on a deep copy
of the same model with the same fresh random inputs, over several steps: parameters, ``.grad``
after the step, optimizer state and the total norm. The models run eagerly here (only the step
is compiled) to keep Inductor compiles few.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch._inductor import metrics
from torch._inductor.utils import run_and_get_code

from compileclip import clip_backend
from helpers import ACTIVE, INACTIVE, assert_clip_state

OPTIMIZERS = {
    "sgd": lambda params, foreach: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=foreach),
    "adam": lambda params, foreach: torch.optim.Adam(params, lr=1e-2, foreach=foreach),
    "adamw": lambda params, foreach: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=foreach),
}


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def assert_state_close(opt: torch.optim.Optimizer, ref_opt: torch.optim.Optimizer, what: str) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    ref_params = [p for g in ref_opt.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(params, ref_params)):
        state, ref_state = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert state.keys() == ref_state.keys(), (what, i, state.keys(), ref_state.keys())
        for key in state:
            torch.testing.assert_close(
                state[key], ref_state[key], msg=lambda m: f"{what} state[{i}][{key!r}]: {m}"
            )


def assert_same(model, ref, opt, ref_opt, clip, ref_norm, what: str, *, grads: bool = True) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{what} param {name}: {m}")
        assert (p.grad is None) == (q.grad is None), (what, name)
        if grads and p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{what} grad of {name}: {m}")
    assert_state_close(opt, ref_opt, what)
    norm = clip.total_norm
    assert norm.dtype == torch.float32 and norm.dim() == 0 and norm.device == ref_norm.device
    torch.testing.assert_close(norm, ref_norm, msg=lambda m: f"{what} total norm: {m}")


def train_against_eager(
    make_opt,
    *,
    max_norm=ACTIVE,
    steps: int = 3,
    make_model=small_mlp,
    backend_kwargs: dict | None = None,
    micro_batches: int = 1,
    between_steps=None,
    norm_type: float = 2.0,
    compile_model: bool = False,
    before_step=None,
):
    """Train ``make_model()`` with a compiled clipped step and a deep copy eagerly; compare
    after every step. ``between_steps(step, opt, ref_opt, clip)`` may change hyperparameters;
    ``before_step(model)`` runs on both models between the backward and the clip.
    ``compile_model`` compiles the model with the same clip object too."""
    torch.manual_seed(0)
    model = make_model()
    ref = copy.deepcopy(model)
    opt, ref_opt = make_opt(model), make_opt(ref)
    clip = clip_backend(max_norm=max_norm, norm_type=norm_type, **(backend_kwargs or {}))
    step = torch.compile(opt.step, backend=clip)
    forward = torch.compile(model, backend=clip) if compile_model else model
    writes_grad = clip.config.step_writes_grad
    mn = max_norm
    for i in range(steps):
        if between_steps is not None:
            between_steps(i, opt, ref_opt, clip)
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        for k in range(micro_batches):
            x = torch.randn(6, 8)
            loss_of(forward, x).backward()
            loss_of(ref, x).backward()
        if before_step is not None:
            before_step(model)
            before_step(ref)
        mn = float(clip.max_norm)
        ref_params = [p for g in ref_opt.param_groups for p in g["params"] if p.grad is not None]
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, mn, norm_type)
        if isinstance(max_norm, float):
            assert_clip_state(ref_norm, max_norm)
        ref_opt.step()
        step()
        assert_same(model, ref, opt, ref_opt, clip, ref_norm, f"step {i}", grads=writes_grad)
    return model, clip


# -- every optimizer x implementation, clip active and inactive --------------------------------


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("foreach", [False, True], ids=["default", "foreach"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_matches_eager(name, foreach, max_norm):
    train_against_eager(lambda m: OPTIMIZERS[name](m.parameters(), foreach), max_norm=max_norm)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_no_grad_write_back(name):
    """step_writes_grad=False: the same update; .grad keeps the unclipped gradient."""
    model, clip = train_against_eager(
        lambda m: OPTIMIZERS[name](m.parameters(), True), backend_kwargs={"step_writes_grad": False}
    )
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(norm, clip.total_norm)  # .grad still holds the pre-clip gradient


def test_aot_eager_inner():
    train_against_eager(lambda m: OPTIMIZERS["adam"](m.parameters(), False), backend_kwargs={"inner": "aot_eager"})


def test_fuse_false_clips_eagerly_before_the_compiled_step():
    train_against_eager(lambda m: OPTIMIZERS["sgd"](m.parameters(), True), backend_kwargs={"fuse": False})


@pytest.mark.parametrize("norm_type", [1.0, 3.0, float("inf")], ids=["p1", "p3", "inf"])
def test_norm_types(norm_type):
    train_against_eager(lambda m: OPTIMIZERS["adam"](m.parameters(), True), norm_type=norm_type)


def test_error_if_nonfinite_is_refused_for_the_step():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch.compile(opt.step, backend=clip_backend(1.0, error_if_nonfinite=True))
    loss_of(model, torch.randn(2, 8)).backward()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="error_if_nonfinite=True is not supported"):
        step()


# -- parameter groups, frozen parameters, grads that are None ----------------------------------


class WithUnused(nn.Module):
    """A frozen layer and a layer the forward never uses (its .grad stays None)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(16, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.frozen(self.a(x))))


@pytest.mark.parametrize("foreach", [False, True], ids=["default", "foreach"])
def test_param_groups_and_none_grads(foreach):
    def make_opt(m):
        return torch.optim.AdamW(
            [
                {"params": [*m.a.parameters(), *m.frozen.parameters()], "lr": 1e-2},
                {"params": [*m.b.parameters(), *m.unused.parameters()], "lr": 3e-3, "weight_decay": 0.0},
            ],
            foreach=foreach,
        )

    model, _ = train_against_eager(make_opt, make_model=WithUnused)
    assert model.unused.weight.grad is None and model.frozen.weight.grad is None


def test_sgd_param_groups():
    def make_opt(m):
        return torch.optim.SGD(
            [{"params": m[0].parameters()}, {"params": [*m[2].parameters(), *m[3].parameters()], "lr": 0.05}],
            lr=0.1, momentum=0.9,
        )

    train_against_eager(make_opt)


# -- hyperparameters as tensors: no recompile --------------------------------------------------


def test_tensor_lr_and_max_norm_change_without_recompile():
    max_norm = torch.tensor(0.05)
    lrs = [1e-2, 5e-3, 2e-3, 2e-2]
    norms = [0.05, 0.02, 1e6, 0.1]

    def make_opt(m):
        # a tensor lr needs the default (for-loop) implementation unless capturable=True
        return torch.optim.Adam(m.parameters(), lr=torch.tensor(lrs[0]), foreach=False)

    def between_steps(i, opt, ref_opt, clip):
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"].fill_(lrs[i])
        max_norm.fill_(norms[i])
        if i == 1:  # compiled once in step 0; nothing may compile from here on
            ctx.__enter__()

    ctx = torch._dynamo.config.patch(error_on_recompile=True)
    try:
        train_against_eager(make_opt, max_norm=max_norm, steps=len(lrs), between_steps=between_steps)
    finally:
        ctx.__exit__(None, None, None)


# -- gradient accumulation: the step sees the final .grad --------------------------------------


def test_gradient_accumulation_needs_no_context_manager():
    train_against_eager(lambda m: OPTIMIZERS["adamw"](m.parameters(), True), micro_batches=3)


# -- the scale costs no loop of its own --------------------------------------------------------


def _step_kernels(name: str, foreach: bool, make_backend, amp: bool = False) -> tuple[int, str]:
    """Loop nests Inductor generates for the last compile of the step, and its code.
    ``make_backend(scaler)`` gives the backend (``scaler`` is a GradScaler with ``amp``)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))  # 4 gradients
    opt = OPTIMIZERS[name](model.parameters(), foreach)
    scaler = torch.amp.GradScaler("cpu") if amp else None
    step = torch.compile(opt.step, backend=make_backend(scaler))
    for _ in range(2):  # SGD compiles again once its momentum buffers exist
        loss = loss_of(model, torch.randn(3, 8))
        (scaler.scale(loss) if amp else loss).backward()
        metrics.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            _, code = run_and_get_code(step)
        if amp:
            scaler.update()
    return metrics.generated_kernel_count, code[-1]


@pytest.mark.parametrize("name,foreach", [("sgd", False), ("adam", True)])
def test_clip_adds_only_the_norm_loops(name, foreach):
    """Measured on CPU (torch 2.13): SGD 4 loop nests without the clip, 5 with it; Adam 8
    and 9. The norm is one extern call (``compileclip::total_norm``), plus one scalar loop
    nest (coefficient and nonfinite flag), whatever the number of gradients. The scale and
    the write-back into .grad are computed and stored inside the optimizer's own update
    loops: no loop nest re-reads the gradients for the scale, with or without the
    write-back. Neither does the nonfinite skip (a select in the update loops), GradScaler's
    unscale (inside the norm operator and the update loops; its inverse scale is one more
    scalar loop), nor value clipping (SGD 4, Adam 8 with clip_value
    alone)."""
    plain, _ = _step_kernels(name, foreach, lambda s: "inductor")
    clipped, code = _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE))
    assert clipped == plain + 1, (plain, clipped)
    assert code.count("torch.ops.compileclip.norms_and_total.default(") == 1
    same_as_clipped = {
        "no write-back": _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE, step_writes_grad=False)),
        "skip_nonfinite": _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE, skip_nonfinite=True)),
        "GradScaler + clip_value": _step_kernels(
            name, foreach, lambda s: clip_backend(ACTIVE, clip_value=1e-3, scaler=s), amp=True
        ),
    }
    for what, (count, _) in same_as_clipped.items():
        # GradScaler: one more scalar loop, the inverse scale
        assert count == clipped + (what.startswith("GradScaler")), (what, count, clipped)
    value_only, _ = _step_kernels(name, foreach, lambda s: clip_backend(clip_value=1e-3))
    assert value_only == plain, (value_only, plain)


def test_step_writes_grad_is_validated():
    with pytest.raises(TypeError, match="step_writes_grad"):
        clip_backend(1.0, step_writes_grad="yes")
