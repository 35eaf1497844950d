"""What the two-rank benchmarks (``ddp_clip.py``, ``fsdp_clip.py``) share: their arguments, the
gloo process group of one rank, spawning the ranks, and writing the table and JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def arguments(doc: str, layers: list[int], width: int, steps: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=layers)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--out", default=None, help="also write the table and JSON here")
    return p.parse_args()


def init(rank: int, port: int) -> None:
    """One rank: one thread, the gloo group on 127.0.0.1."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=600))


def spawn(run_rank, args, name: str) -> list[dict]:
    """Run ``run_rank(rank, port, args, out)`` on both ranks; returns what rank 0 wrote to ``out``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/{name}.json"
    mp.spawn(run_rank, args=(port, args, out), nprocs=WORLD)
    return json.loads(Path(out).read_text())


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: 1e3 * float(statistics.median(v)) for k, v in times.items()}


def finish(rank: int, results: list[dict], out: str) -> None:
    """Rank 0 hands its results to ``spawn``; both leave the group."""
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def machine() -> str:
    return f"{WORLD} gloo ranks, 1 thread each; torch {torch.__version__}, {platform.processor() or platform.machine()}"


def write(text: str, results: list[dict], out: str | None, name: str) -> None:
    """Print the table; with ``out``, also write it and the JSON there."""
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.md").write_text(text + "\n")
        (Path(out) / f"{name}.json").write_text(json.dumps(results, indent=1))
