"""``ClipBackend.plot``: the norm history as a PNG (matplotlib, an optional extra)."""

from __future__ import annotations

import math
import textwrap

import torch


def plot_history(path, norms: torch.Tensor, thresholds: torch.Tensor, *, first_step: int = 1,
                 title: str = "", q: float = 0.95) -> None:
    """Norm per step (line), threshold per step (step line; where it is finite), the steps the
    clip scaled down (norm above threshold, marked), and the ``q``-quantile of the finite norms
    (the value ``suggest_max_norm(q)`` returns)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # the optional extra
        raise ImportError("compileclip: clip.plot needs matplotlib: pip install 'compileclip[plot]'") from e
    norms = norms.detach().float().cpu()
    thrs = thresholds.detach().float().cpu()
    if norms.numel() == 0:
        raise RuntimeError("compileclip: the history is empty: nothing to plot yet")
    steps = torch.arange(first_step, first_step + norms.numel())
    clipped = torch.isfinite(norms) & (norms > thrs)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    ax.plot(steps, norms, color="tab:blue", lw=1.2, label="pre-clip gradient norm")
    shown = torch.where(torch.isfinite(thrs), thrs, torch.full_like(thrs, math.nan))
    finite_thr = torch.isfinite(shown)
    if bool(finite_thr.any()):
        label = "threshold (max_norm used)"
        if float(finite_thr.float().mean()) < 0.5:  # a policy that leaves most steps alone (inf)
            label = "threshold (on the steps the policy clipped)"
        ax.step(steps, shown, where="mid", color="tab:orange", lw=1.2, marker="_", ms=10, mew=2, label=label)
        ax.plot(steps[clipped], torch.minimum(norms, thrs)[clipped], "v", color="tab:orange", ms=4,
                label="norm after clipping")
    ax.plot(steps[clipped], norms[clipped], "o", mfc="none", color="tab:red", ms=7,
            label=f"clipped steps ({int(clipped.sum())})")
    finite = norms[torch.isfinite(norms)]
    if finite.numel():
        suggested = float(torch.quantile(finite, q))
        ax.axhline(suggested, color="tab:green", ls="--", lw=1,
                   label=f"suggest_max_norm({q}) = {suggested:.3g} (all {finite.numel()} steps, spikes included)")
        if float(finite.max()) > 20 * max(float(finite.median()), 1e-30):
            ax.set_yscale("log")  # a spike would flatten the rest
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient norm")
    ax.set_title("\n".join(textwrap.fill(line, 90) for line in title.splitlines()), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
