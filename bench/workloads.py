"""The benchmark's workloads: each model takes (inputs, targets) and returns the scalar loss, so
the loss is inside the compiled region.

``tests/models.py`` holds the golden-test zoo: tiny models (8-32 wide) that return outputs, not
losses, sized for exactness checks. None of them has the size or the parameter-tensor count the
benchmark needs, so the bench keeps its own models (the GPT block is the same architecture as
``tests.models.Block``, wider and with the loss inside).

    mlp   4 x (Linear(1024, 1024) -> LayerNorm -> ReLU), MSE: 4.2M params in 16 tensors
    deep  256 residual tanh(Linear(64, 64)) layers, MSE: 1.06M params in 512 tensors
    gpt   decoder, 10 layers, d=256, vocab 8192, tied head: ~10M params
    lstm  2 x LSTMCell(512) unrolled over 16 steps in Python (optional, not in the default set)

``--size`` scales the width (mlp, gpt, lstm) or the depth (deep) of each.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL = ["mlp", "deep", "gpt", "lstm"]
DEFAULT = ["mlp", "deep", "gpt"]
DEFAULT_SIZE = {"mlp": 1.0, "deep": 1.0, "gpt": 1.0, "lstm": 1.0}


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
    """Many small residual tanh layers: 2 parameter tensors per layer, where eager clipping is
    per-tensor overhead."""

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

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def tensors(self) -> int:
        return len(list(self.model.parameters()))

    @property
    def grad_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def round64(x: float) -> int:
    return max(64, 64 * round(x / 64))


def build(name: str, size: float, device: torch.device) -> Workload:
    """The model (seed 0) and one fixed batch (seed 1) of a workload."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        width = round64(1024 * size)
        model = MLP(width)
        batch = (torch.randn(64, width, generator=gen), torch.randn(64, width, generator=gen))
        desc = f"4 x (Linear({width},{width}) -> LayerNorm -> ReLU), batch 64, MSE"
    elif name == "deep":
        layers = max(1, round(256 * size))
        model = DeepMLP(layers)
        batch = (torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen))
        desc = f"{layers} residual tanh(Linear(64,64)) layers, batch 64, MSE"
    elif name == "gpt":
        d, vocab, seq, layers, bsz = round64(256 * size), 8192, 128, 10, 8
        model = GPT(vocab, d, layers, seq)
        batch = (torch.randint(vocab, (bsz, seq), generator=gen),
                 torch.randint(vocab, (bsz, seq), generator=gen))
        desc = (f"GPT d={d} layers={layers} heads={max(1, d // 64)} vocab={vocab}, "
                f"batch {bsz}x{seq}, tied embedding")
    elif name == "lstm":
        hidden, vocab, seq, bsz = round64(512 * size), 4096, 16, 32
        model = LSTMLM(vocab, hidden)
        batch = (torch.randint(vocab, (bsz, seq), generator=gen),
                 torch.randint(vocab, (bsz, seq), generator=gen))
        desc = f"2 x LSTMCell({hidden}) unrolled over {seq} steps, vocab {vocab}, batch {bsz}"
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {ALL}")
    return Workload(name, size, model.to(device), tuple(t.to(device) for t in batch), desc)
