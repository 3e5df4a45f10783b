"""The main job's data and model: scikit-learn's handwritten digits (no download) and a small CNN.

``load_digits`` gives 1797 grayscale 8x8 images of the digits 0-9 (pixel values 0-16). We scale them to
[-1, 1] and hold out a fixed, stratified quarter as the test set (the split never depends on ``--seed``).
"""

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

NUM_CLASSES = 10
_TEST_FRACTION = 0.25
_SPLIT_SEED = 0


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train (1347, 1, 8, 8) float32, y_train (1347,) int64, x_test (450, 1, 8, 8), y_test (450,))``."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    train, test = train_test_split(range(len(labels)), test_size=_TEST_FRACTION, random_state=_SPLIT_SEED,
                                   stratify=data.target)
    return images[train], labels[train], images[test], labels[test]


class DigitsCNN(nn.Module):
    """Two conv blocks (conv 3x3 -> GroupNorm -> tanh -> max-pool) and a linear head: ``(B, 1, 8, 8)`` ->
    raw logits ``(B, 10)``. GroupNorm, not BatchNorm, so that each example's output depends on it alone;
    tanh, whose bounded activations keep gradient norms (and so clipping) tame under DP-SGD."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(4, width), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.Tanh(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 2 * 2, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))
