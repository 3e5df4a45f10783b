"""Models for the engine's tests: the package's GPT (:mod:`persample.models`, the one the benchmarks time) at a
test size, and a CNN whose first ReLU works in place on a hooked output."""

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from persample.models import GPT

TinyGPT = functools.partial(GPT, vocab=24, d=8, layers=1, heads=2, max_len=16)


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
