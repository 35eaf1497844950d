"""The model zoo of the golden-output suite: small, deterministic (no dropout)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.LayerNorm(width), nn.Linear(width, 4))


def mlp_input(step: int, batch: int = 6) -> tuple:
    return (torch.randn(batch, 8),)


def encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)


def seq_input(step: int) -> tuple:
    return (torch.randn(3, 5, 16),)


class TinyGPT(nn.Module):
    """Decoder-only transformer with the output projection tied to the input embedding."""

    def __init__(self, vocab: int = 32, dim: int = 16, layers: int = 2, heads: int = 2, ctx: int = 8):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(ctx, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


def tokens_input(step: int) -> tuple:
    return (torch.randint(0, 32, (3, 8)),)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def image_input(step: int) -> tuple:
    return (torch.randn(4, 3, 8, 8),)


class RNNModel(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.rnn = kind(6, 5, batch_first=True)
        self.out = nn.Linear(5, 4)

    def forward(self, x):
        h, _ = self.rnn(self.inp(x))
        return self.out(h)


def rnn_input(step: int) -> tuple:
    return (torch.randn(2, 7, 8),)


class CellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(8, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 6)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.out(h)


def frozen() -> nn.Module:
    m = mlp()
    m[0].requires_grad_(False)
    m[3].bias.requires_grad_(False)
    return m


class GraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(x)


# -- optimizers and a loss shared by the step tests ------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda params, foreach: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=foreach),
    "adam": lambda params, foreach: torch.optim.Adam(params, lr=1e-2, foreach=foreach),
    "adamw": lambda params, foreach: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=foreach),
}


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()
