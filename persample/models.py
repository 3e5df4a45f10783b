"""Small reference models: the ones the benchmarks time and the engine's tests check, so that the benchmarked
model is the tested one.

* :class:`GPT` — a nanoGPT-shaped language model (token and positional embeddings, pre-norm blocks of causal
  self-attention and an MLP, a final norm, an LM head tied to the token table), with the options that change
  what the per-example gradient engine sees: how the positional table is indexed, a tied or untied head, and
  LayerNorm or RMSNorm.
* :class:`CNN` — three convolutions with ReLUs, global average pooling and a linear classifier.
* :class:`WideResNet` — a WRN-depth-width with GroupNorm, the reference network of DP-SGD image classification.

All take ``(B, ...)`` batches and return ``(B, ..., classes)`` logits for :func:`persample.cross_entropy`.
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


class WideBlock(nn.Module):
    """A pre-activation residual block of :class:`WideResNet`: GroupNorm, ReLU, 3x3 convolution, twice, and a
    1x1 convolution on the shortcut where the width or the resolution changes. Nothing in place: hook-based
    engines (Opacus) read every module's output after the forward."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, cin), nn.GroupNorm(groups, cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(h)
        return skip + self.conv2(F.relu(self.norm2(self.conv1(h))))


class WideResNet(nn.Module):
    """Images ``(B, 3, H, W)`` to logits ``(B, classes)``: WRN-``depth``-``widen`` with GroupNorm in place of
    BatchNorm (whose batch statistics mix examples, which DP-SGD cannot clip). A 3x3 stem to 16 channels, three
    stages of ``(depth - 4) / 6`` :class:`WideBlock` at 16, 32 and 64 times ``widen`` channels (the last two
    halving the resolution), a final GroupNorm and ReLU, global average pooling and a linear classifier.

    Examples:
        >>> import torch
        >>> from persample.models import WideResNet
        >>> WideResNet(depth=10, widen=1)(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])

    References:
        Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016. De et al., "Unlocking High-Accuracy
        Differentially Private Image Classification through Scale", 2022 (WRN-16-4 with GroupNorm for DP-SGD on
        CIFAR-10; they also standardize the convolutions' weights, which this model does not).
    """

    def __init__(self, depth: int = 16, widen: int = 4, classes: int = 10, groups: int = 16):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6 * n + 4 with n >= 1, got {depth}")
        if widen < 1:
            raise ValueError(f"WideResNet: widen must be a positive integer, got {widen}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*(
            WideBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], 2 if i > 0 and j == 0 else 1, groups)
            for i in range(3) for j in range(blocks)))
        self.norm = nn.GroupNorm(groups, widths[3])
        self.fc = nn.Linear(widths[3], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.fc(x.mean((2, 3)))
