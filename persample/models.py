"""Small reference models: the ones the benchmarks time and the engine's tests check, so that the benchmarked
model is the tested one.

* :class:`GPT` — a nanoGPT-shaped language model (token and positional embeddings, pre-norm blocks of causal
  self-attention and an MLP, a final norm, an LM head tied to the token table), with the options that change
  what the per-example gradient engine sees: how the positional table is indexed, a tied or untied head, and
  LayerNorm or RMSNorm.
* :class:`CNN` — three convolutions with ReLUs, global average pooling and a linear classifier.

Both take ``(B, ...)`` batches and return ``(B, ..., classes)`` logits for :func:`persample.cross_entropy`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITIONS = ("arange", "expand", "repeat", "broadcast")


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` with a 4x GELU MLP."""

    def __init__(self, d: int, heads: int, norm: type[nn.Module] = nn.LayerNorm):
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


class GPT(nn.Module):
    """A GPT on token ids ``idx: (B, T)`` (``T <= max_len``), returning logits ``(B, T, vocab)``.

    Args:
        vocab, d, layers, heads, max_len: vocabulary size, width, number of blocks, attention heads (dividing
            ``d``) and the positional table's length.
        positions: how the positional table is indexed; the math is the same for all. ``"arange"`` with
            ``arange(T)`` (no batch dimension), ``"expand"`` with ``arange(T).expand(B, T)``, ``"repeat"`` with
            a contiguous ``arange(T).repeat(B, 1)``, ``"broadcast"`` with ``arange(T)[None]`` (transformers'
            ``position_ids``). Opacus supports only some of these.
        tied: the LM head shares the token table's weight; ``False`` gives the head its own (``vocab * d``
            more parameters).
        norm: the normalization layer's class, called as ``norm(d)`` (``nn.LayerNorm`` or ``nn.RMSNorm``).

    Raises:
        ValueError: ``positions`` is not one of the above, or ``heads`` does not divide ``d``.

    Examples:
        >>> import torch
        >>> from persample.models import GPT
        >>> model = GPT(vocab=50, d=16, layers=2, heads=2, max_len=8)
        >>> model(torch.randint(0, 50, (3, 8))).shape
        torch.Size([3, 8, 50])
    """

    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int, positions: str = "arange",
                 tied: bool = True, norm: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if d % heads:
            raise ValueError(f"heads must divide d, got d={d} and heads={heads}")
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
        if self.positions == "expand":
            pos = pos.expand(B, T)
        elif self.positions == "repeat":
            pos = pos.repeat(B, 1)
        elif self.positions == "broadcast":
            pos = pos[None]
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class CNN(nn.Module):
    """Images ``(B, 3, H, W)`` to logits ``(B, classes)``: three 3x3 convolutions (the last two with stride 2)
    with ReLUs, global average pooling and a linear classifier.

    Examples:
        >>> import torch
        >>> from persample.models import CNN
        >>> CNN(classes=10, width=8)(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """

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
