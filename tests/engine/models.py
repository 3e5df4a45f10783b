"""Small models for the engine's tests."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int, norm: type[nn.Module]):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = norm(d), norm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token and positional embeddings, pre-norm blocks, final norm and an LM head tied to the token table.

    ``positions``: ``"arange"`` looks up ``arange(T)`` with no batch dimension, ``"expand"`` looks up
    ``arange(T).expand(B, T)``, ``"broadcast"`` looks up ``arange(T)[None]`` (transformers' position_ids).
    """

    def __init__(self, vocab: int = 24, d: int = 8, layers: int = 1, heads: int = 2, max_len: int = 16,
                 positions: str = "arange", tied: bool = True, norm: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.positions = positions
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, norm) for _ in range(layers))
        self.ln = norm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        pos = {"arange": pos, "expand": pos.expand(B, T), "broadcast": pos[None]}[self.positions]
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x), inplace=True)
        x = F.max_pool2d(F.relu(self.conv2(x)), 1)
        return self.fc(x.flatten(1))
