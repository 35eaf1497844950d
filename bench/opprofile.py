"""What the clip itself costs, op by op: a few steps of every clipping variant and of its
no-clip baseline under torch.profiler (CPU activities); per op name, the self CPU time per
step in the variant minus that in the baseline. What is left is the clip's own work (plus
noise): its norm and scale ops, and the compiled graphs that got longer.

Inductor's C++ kernels run inside one record per compiled graph (``## Call CompiledFxGraph
<hash> ##``), whose self time is theirs. With ``--kernel-profile`` the bench compiles with
``torch._inductor.config.cpp.enable_kernel_profile`` and each ``cpp_fused_*`` kernel is a
record of its own (at the cost of a RECORD_FUNCTION per kernel call in every timed step).

Names are normalized before they are compared: graph hashes and the trailing kernel index
(``cpp_fused_add_tanh_12`` -> ``cpp_fused_add_tanh_*``) are dropped, as they differ between
the graphs of two variants.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections import defaultdict
from typing import Callable

from torch.profiler import ProfilerActivity, profile

# the ops a clip is made of; listed first in the report, whatever their rank
CLIP_OPS = re.compile(r"compileclip|_foreach_norm|_foreach_mul|linalg_vector_norm|norm|clip|"
                      r"_foreach_div|reciprocal|clamp", re.IGNORECASE)
_HASH = re.compile(r"\b[a-z]?[0-9a-z]{40,}\b")
_INDEX = re.compile(r"_\d+$")


def normalize(name: str) -> str:
    name = _HASH.sub("*", name)
    if name.startswith("cpp_fused") or name.startswith("cpp_"):
        name = _INDEX.sub("_*", name)
    return name


@contextlib.contextmanager
def quiet_stderr():
    """Kineto writes a ``USDT: ... profiler_start`` line to fd 2 per profile; drop those, pass
    anything else on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = [ln for ln in tmp.read().decode(errors="replace").splitlines()
                    if not ln.startswith("USDT:")]
            if rest:
                print("\n".join(rest), file=sys.stderr)


def ops_per_step(step: Callable[[], None], steps: int) -> dict[str, dict]:
    """Self CPU time (us) and calls per step of every op name, over ``steps`` profiled steps
    (after one unprofiled step)."""
    step()
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out: dict[str, dict] = defaultdict(lambda: {"self_us": 0.0, "calls": 0.0})
    for evt in prof.key_averages():
        row = out[normalize(evt.key)]
        row["self_us"] += evt.self_cpu_time_total / steps
        row["calls"] += evt.count / steps
    return dict(out)


def added_ops(variant: dict[str, dict], baseline: dict[str, dict], top: int = 8) -> dict:
    """Per op name, variant minus baseline (self us and calls per step). Returns the named
    clip ops, the top ``top`` other ops by added self time, and the sums."""
    rows = []
    for name in set(variant) | set(baseline):
        v, b = variant.get(name, {}), baseline.get(name, {})
        rows.append({"op": name,
                     "self_us": v.get("self_us", 0.0) - b.get("self_us", 0.0),
                     "calls": v.get("calls", 0.0) - b.get("calls", 0.0),
                     "variant_self_us": v.get("self_us", 0.0)})
    rows.sort(key=lambda r: -r["self_us"])
    clip_rows = [r for r in rows if CLIP_OPS.search(r["op"]) and (r["calls"] or r["variant_self_us"])]
    others = [r for r in rows if r not in clip_rows][:top]
    return {
        "clip_ops": clip_rows[:top],
        "top_added": others,
        "clip_ops_self_us": sum(r["self_us"] for r in clip_rows),
        "all_added_self_us": sum(r["self_us"] for r in rows),
    }


def profile_variants(steps_of: dict[str, Callable[[], None]], pairs: dict[str, str],
                     steps: int = 3, top: int = 8) -> dict:
    """``pairs``: clipping variant -> its no-clip baseline. Profiles every name that occurs
    and returns the added ops per clipping variant."""
    names = list(dict.fromkeys([*pairs, *pairs.values()]))
    per = {n: ops_per_step(steps_of[n], steps) for n in names}
    return {v: {"baseline": b, **added_ops(per[v], per[b], top)} for v, b in pairs.items()}
