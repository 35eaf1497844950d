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
from models import GraphBreak

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


# -- one object for model and step: clipped exactly once per step -----------------------------


@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_one_object_for_model_and_step(micro_batches, max_norm):
    _, clip = train_against_eager(
        lambda m: OPTIMIZERS["sgd"](m.parameters(), False), max_norm=max_norm, steps=3,
        compile_model=True, micro_batches=micro_batches,
    )
    # the first step runs before its graph exists (torch.compile(opt.step) directly), so the
    # hook clips it eagerly; later steps clip in the graph. The backward's norm is used
    # unless the gradients were accumulated (from the very first step: issue 8, setup 11)
    assert clip.stats["step_eager"] == 1 and clip.stats["step_in_graph"] == 2, clip.stats
    assert clip.stats.get("norm_from_backward", 0) == (3 if micro_batches == 1 else 0), clip.stats


def _double_first_grad_after_step_0():
    calls = []

    def before_step(model: nn.Module) -> None:
        calls.append(model)
        if len(calls) > 2:
            next(iter(model.parameters())).grad.mul_(2.0)

    return before_step


@pytest.mark.parametrize("case", ["grad_changed_before_step", "graph_break"])
def test_one_object_declines_the_backward_norm(case):
    """Where the backward's norm is not the norm of exactly the gradients the step sees,
    the step computes its own, and the result still matches eager."""
    kwargs = {}
    make_opt = lambda m: OPTIMIZERS["adam"](m.parameters(), True)  # noqa: E731
    if case == "grad_changed_before_step":
        kwargs["before_step"] = _double_first_grad_after_step_0()
    else:
        kwargs["make_model"] = GraphBreak
    _, clip = train_against_eager(make_opt, compile_model=True, **kwargs)
    if case == "graph_break":  # each graph's norm covers its own parameters: combined
        assert clip.stats["norm_from_backward"] == 3, clip.stats
    else:  # from the second step on the gradients were edited
        assert clip.stats["norm_from_backward"] == 1, clip.stats


def _halve_grad_in_place(p: torch.Tensor) -> None:
    p.grad.mul_(0.5)


@pytest.mark.parametrize("case", ["autograd_grad", "tensor_hook", "post_accumulate_hook"])
def test_one_object_hand_off_declined_for_gradient_edits(case):
    """Gradients that reach .grad other than straight from the backward graph: computed with
    torch.autograd.grad and assigned, or changed by the user's own hooks. The backward's
    norm is not handed on, and the result is eager's."""
    torch.manual_seed(0)
    model = small_mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = OPTIMIZERS["sgd"](model.parameters(), False), OPTIMIZERS["sgd"](ref.parameters(), False)
    clip = clip_backend(max_norm=ACTIVE)
    for m in (model, ref):
        if case == "tensor_hook":
            m[0].weight.register_hook(lambda g: g * 0.5)
        elif case == "post_accumulate_hook":
            m[0].weight.register_post_accumulate_grad_hook(_halve_grad_in_place)
    forward, step = torch.compile(model, backend=clip), torch.compile(opt.step, backend=clip)
    if True:
        for i in range(3):
            x = torch.randn(6, 8)
            for m, fwd in ((model, forward), (ref, ref)):
                loss = loss_of(fwd, x)
                if case == "autograd_grad":
                    grads = torch.autograd.grad(loss, list(m.parameters()))
                    for p, g in zip(m.parameters(), grads):
                        p.grad = 3.0 * g
                else:
                    loss.backward()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
            ref_opt.step()
            step()
            assert_same(model, ref, opt, ref_opt, clip, ref_norm, f"step {i}")
            opt.zero_grad()
            ref_opt.zero_grad()
    assert clip.stats.get("norm_from_backward", 0) == 0, clip.stats


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
    """Measured on CPU (torch 2.13): SGD 4 loop nests without the clip, 9 with it; Adam 8
    and 13 (4 per-gradient norm reductions + 1 combine). The scale and the write-back into
    .grad are computed and stored inside the optimizer's own update loops: no loop nest
    re-reads the gradients for the scale, with or without the write-back. Neither does the
    nonfinite skip (a select in the update loops), GradScaler's unscale and inf check (in
    the norm loops), nor value clipping (SGD 4, Adam 8 with clip_value alone)."""
    plain, _ = _step_kernels(name, foreach, lambda s: "inductor")
    clipped, code = _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE))
    n_grads = 4
    assert clipped == plain + n_grads + 1, (plain, clipped)
    assert "sum" in code  # the norm reductions are in the step's code
    same_as_clipped = {
        "no write-back": _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE, step_writes_grad=False)),
        "skip_nonfinite": _step_kernels(name, foreach, lambda s: clip_backend(ACTIVE, skip_nonfinite=True)),
        "GradScaler + clip_value": _step_kernels(
            name, foreach, lambda s: clip_backend(ACTIVE, clip_value=1e-3, scaler=s), amp=True
        ),
    }
    for what, (count, _) in same_as_clipped.items():
        assert count == clipped, (what, count, clipped)
    value_only, _ = _step_kernels(name, foreach, lambda s: clip_backend(clip_value=1e-3))
    assert value_only == plain, (value_only, plain)


def test_step_writes_grad_is_validated():
    with pytest.raises(TypeError, match="step_writes_grad"):
        clip_backend(1.0, step_writes_grad="yes")


def test_one_object_norm_in_backward_coefficient_in_step():
    """One clip object for model and step: the backward computes the norm and leaves the
    gradients alone, and the step runs a variant that takes that norm as an input (stats'
    norm_from_backward).

    Loop nests measured on CPU (torch 2.13), 2-layer MLP (4 gradients), SGD with momentum:
    backward 3 plain, 6 with the norm (no scale loops: the backward never scales, so it
    compiles once; before issue 8 it compiled a scaling variant first, 10 loop nests).
    Each step compile builds two variants: the norm-computing one (plain 4 + 5, as in
    test_clip_adds_only_the_norm_loops) and the one taking the norm (plain 4 + 1 scalar
    kernel for the nonfinite flag), 14 in all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = OPTIMIZERS["sgd"](model.parameters(), False)
    clip = clip_backend(ACTIVE)
    forward, step = torch.compile(model, backend=clip), torch.compile(opt.step, backend=clip)
    counts = []
    with torch._inductor.config.patch(fx_graph_cache=False):
        for _ in range(3):
            loss = loss_of(forward, torch.randn(3, 8))
            metrics.reset()
            loss.backward()
            backward = metrics.generated_kernel_count
            metrics.reset()
            step()
            counts.append((backward, metrics.generated_kernel_count))
            opt.zero_grad()
    # step 0: the backward, both step variants; step 1: the step compiles again once SGD's
    # momentum buffers exist; step 2: nothing compiles
    assert counts == [(6, 14), (0, 14), (0, 0)], counts
    # step 0 is clipped by the hook (its graph did not exist yet) with the backward's norm too
    assert clip.stats["norm_from_backward"] == 3, clip.stats


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_one_object_dynamic_shapes(inner):
    """Batch sizes that change every step under dynamic=True: the norm-computing backward and
    the norm-taking step variant still match eager."""
    torch.manual_seed(0)
    model = small_mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = OPTIMIZERS["adamw"](model.parameters(), True), OPTIMIZERS["adamw"](ref.parameters(), True)
    clip = clip_backend(max_norm=ACTIVE, inner=inner)
    forward = torch.compile(model, backend=clip, dynamic=True)
    step = torch.compile(opt.step, backend=clip)
    for i, batch in enumerate([3, 5, 7, 9, 4]):
        x = torch.randn(batch, 8)
        loss_of(forward, x).backward()
        loss_of(ref, x).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
        assert_clip_state(ref_norm, ACTIVE)
        ref_opt.step()
        step()
        assert_same(model, ref, opt, ref_opt, clip, ref_norm, f"step {i}")
        opt.zero_grad()
        ref_opt.zero_grad()
    # every step used the backward's norm (the first one in the hook, its graph not yet built)
    assert clip.stats["norm_from_backward"] == 5, clip.stats


def test_whole_training_step_compiled_with_the_clip():
    """One torch.compile over forward, backward, step and zero_grad: Dynamo splits it at
    backward() and at the optimizer's own graph breaks, and the one backend sees the model
    graph and the step graph, as with two compiles of one object."""
    torch.manual_seed(0)
    model = small_mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = OPTIMIZERS["adamw"](model.parameters(), True), OPTIMIZERS["adamw"](ref.parameters(), True)
    clip = clip_backend(max_norm=ACTIVE)

    @torch.compile(backend=clip)
    def train_step(x):
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    for i in range(4):
        x = torch.randn(6, 8)
        train_step(x)
        loss_of(ref, x).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
        assert_clip_state(ref_norm, ACTIVE)
        ref_opt.step()
        ref_opt.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"step {i}: {m}")
        assert_state_close(opt, ref_opt, f"step {i}")
        torch.testing.assert_close(clip.total_norm, ref_norm)
    assert clip.stats["norm_from_backward"] == 4, clip.stats


# -- clip.compile_step: the step never runs unclipped -----------------------------------------


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["clip", "skip"])
def test_compile_step_clips_eagerly_when_dynamo_falls_back(skip_nonfinite):
    """At Dynamo's recompile limit compile_step's call raises inside Dynamo instead of running
    the step uncompiled; the step then runs eagerly, clipped (or skipped) by the hook."""
    torch.manual_seed(0)
    model = small_mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = OPTIMIZERS["adam"](model.parameters(), True), OPTIMIZERS["adam"](ref.parameters(), True)
    clip = clip_backend(max_norm=ACTIVE, skip_nonfinite=skip_nonfinite)
    step = clip.compile_step(opt)
    for i in range(4):
        x = torch.randn(6, 8)
        if skip_nonfinite and i == 3:
            x[0, 0] = float("nan")
        loss_of(model, x).backward()
        loss_of(ref, x).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), ACTIVE)
        if torch.isfinite(ref_norm):
            ref_opt.step()
        if i < 2:
            step()
        else:  # Dynamo falls back to eager for this frame from now on
            torch._dynamo.reset()
            with torch._dynamo.config.patch(recompile_limit=0):
                step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"step {i}: {m}")
        assert_state_close(opt, ref_opt, f"step {i}")
        torch.testing.assert_close(clip.total_norm, ref_norm, equal_nan=True)
        opt.zero_grad()
        ref_opt.zero_grad()
    if skip_nonfinite:
        assert int(clip.skipped_steps) == 1
    assert clip.stats["step_recompile_limit"] == 2, clip.stats


def test_compile_step_costs_no_recompile():
    """The pre-hook is registered before the first trace: the same graphs compile as with
    torch.compile(opt.step, backend=clip)."""
    counts = []
    for use_compile_step in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = small_mlp()
        opt = OPTIMIZERS["sgd"](model.parameters(), False)
        clip = clip_backend(max_norm=ACTIVE)
        step = clip.compile_step(opt) if use_compile_step else torch.compile(opt.step, backend=clip)
        before = _graphs_compiled()
        for _ in range(3):
            loss_of(model, torch.randn(6, 8)).backward()
            step()
            opt.zero_grad()
        counts.append(_graphs_compiled() - before)
    assert counts[0] == counts[1], counts


def test_compile_step_validates_its_argument():
    with pytest.raises(TypeError, match="compile_step needs a torch.optim.Optimizer, got Linear"):
        clip_backend(1.0).compile_step(nn.Linear(2, 2))


def test_clips_made_and_collected_between_steps_cost_no_recompile():
    """The traced part of torch's step hooks reads no state of compileclip: another clip object
    appearing or being garbage-collected must not recompile the compiled step."""
    import gc

    model = small_mlp()
    opt = OPTIMIZERS["adam"](model.parameters(), True)
    step = clip_backend(max_norm=ACTIVE).compile_step(opt)
    others = []
    for i in range(5):
        loss_of(model, torch.randn(6, 8)).backward()
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            step()
        opt.zero_grad()
        if i % 2:  # the number of live clips changes at every step
            others.append(clip_backend(max_norm=1.0))
        else:
            others.clear()
            gc.collect()
