"""Models for the benchmarks: a plain GPT (nanoGPT-shaped) and a small CNN."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token and positional embeddings, pre-norm blocks, a final LayerNorm and an LM head tied to the
    token embedding.

    ``positions`` says how the positional table is indexed: ``"arange"`` with ``arange(T)`` (no batch
    dimension; the default), ``"expand"`` with ``arange(T).expand(B, T)``, ``"repeat"`` with a contiguous
    ``arange(T).repeat(B, 1)``. The math is the same. ``tied=False``
    gives the head its own weight (a different model, with ``V * d`` more parameters). Opacus supports only
    some of these.
    """

    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int, positions: str = "arange",
                 tied: bool = True):
        super().__init__()
        self.positions = positions
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        pos = {"arange": pos, "expand": pos.expand(B, T), "repeat": pos.repeat(B, 1)}[self.positions]
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class CNN(nn.Module):
    """Three convolutions with GroupNorm-free ReLUs, global average pooling and a linear classifier."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))
