"""Distributed golden tests: DDP and FSDP2 (gloo, 2 CPU processes) against eager.

Each case spawns 2 ranks (``dist_worker.main``) that train a compiled copy and an eager copy
of the same DDP/FSDP2-wrapped model for 3 steps, with the clip active and inactive, and
assert after every step that every parameter, every ``.grad`` (after the step) and
``clip.total_norm`` equal eager ``clip_grad_norm_(model.parameters(), ...); opt.step()``
(and, for DDP, that the parameters are equal across ranks). See ``dist_worker.py``.

A failure in a rank fails the test with that rank's traceback
(``torch.multiprocessing.ProcessRaisedException``); a hang fails it after ``TIMEOUT_S``.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch.distributed as dist

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import dist_shards  # noqa: E402
import dist_worker  # noqa: E402

TIMEOUT_S = 300


def _have_fsdp2() -> bool:
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(name: str, main=dist_worker.main) -> None:
    ctx = mp.spawn(main, args=(_free_port(), name), nprocs=dist_worker.WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    # join() raises ProcessRaisedException (with the rank's traceback) or
    # ProcessExitedException as soon as one rank fails, and terminates the other rank
    while True:
        failure = None
        try:
            if ctx.join(timeout=2):
                return
        except mp.ProcessRaisedException as e:  # the failing rank's own traceback, in full
            failure = str(e)
        except mp.ProcessExitedException as e:  # killed by a signal, or exited without one
            failure = str(e)
        if failure is not None:  # outside the except block: no chained second copy
            pytest.fail(f"{name}: {failure}", pytrace=False)
        if time.monotonic() > deadline:
            for p in ctx.processes:  # only the two processes this test started
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(10)
            pytest.fail(f"{name}: the ranks did not finish within {TIMEOUT_S} s (a hang?)")


@pytest.fixture(autouse=True)
def _one_thread_children(monkeypatch):
    # inherited by the spawned ranks (which also set it themselves before any work)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


DDP_CASES = [n for n, c in dist_worker.CASES.items() if c["wrapper"] in ("ddp", "manual")]
FSDP_CASES = [n for n, c in dist_worker.CASES.items() if c["wrapper"] == "fsdp"]


@pytest.mark.parametrize("name", DDP_CASES)
def test_ddp(name):
    _spawn(name)


@pytest.mark.skipif(not _have_fsdp2(), reason="FSDP2 (fully_shard, init_device_mesh) not available")
@pytest.mark.parametrize("name", FSDP_CASES)
def test_fsdp2(name):
    _spawn(name)


@pytest.mark.skipif(not _have_fsdp2(), reason="FSDP2 (fully_shard, init_device_mesh) not available")
@pytest.mark.parametrize("name", list(dist_shards.CASES))
def test_dtensor_bitwise(name):
    """FSDP2, HSDP, mixed precision, tensor parallel: the clip against eager clip_grad_norm_ on
    the same DTensors, bit for bit (``dist_shards.py``)."""
    _spawn(name, dist_shards.main)


@pytest.mark.skipif(not _have_fsdp2(), reason="FSDP2 (fully_shard, init_device_mesh) not available")
def test_fsdp2_step_ops_constant():
    """The clip at an FSDP2 step dispatches the same ops for 10, 66, 258 and 1026 gradients."""
    _spawn("ops", dist_shards.main_ops)


@pytest.mark.skipif(not _have_fsdp2(), reason="FSDP2 (fully_shard, init_device_mesh) not available")
def test_fsdp2_compiled_step_kernels_constant():
    """A compiled step over FSDP2's DTensor gradients adds the same kernels at 6 and 18."""
    _spawn("step_kernels", dist_shards.main_step_kernels)
