"""White-box canaries: a parameter block that the model never uses, and examples whose gradient is a Dirac on it.

:class:`CanaryModel` wraps a classifier ``model`` and adds ``canary_block``, an ``nn.Embedding(m + 1, 1,
padding_idx=m)`` whose rows ``0..m-1`` are the block (row ``m`` is the padding row: ordinary examples look it
up, and ``padding_idx`` gives it no gradient). The wrapper's input is one flat row per example, the
flattened ``model`` input followed by a canary id (:func:`pack`): ``m`` for an ordinary example, ``j`` for
canary ``j``. Its logits are::

    ordinary example:   model(x)                          (the block's row m is 0 and has no gradient)
    canary j:           model(x) * 0 + w_j * s * e_0      (target class 0)

so the real cross-entropy of canary ``j`` has gradient ``s (softmax(w_j s e_0)_0 - 1)`` on ``w_j`` alone, and
exactly zero on ``model``'s parameters. The block's learning rate is 0, so ``w_j`` stays 0 and the gradient
is ``-0.9 s``; ``s`` makes its size ``gradient_scale * max_grad_norm``, beyond the clipping bound, and
clipping cuts it to ``max_grad_norm``. The canaries thus take exactly the path of any example: Poisson
sampling, the per-sample engine, clipping, the optimizer's noise and scaling.

Scoring (:class:`CanaryScores`): after each step, the block's noisy gradient ``g`` (the sum of the
clipped gradients plus ``N(0, (sigma C)^2)``, divided by the expected batch size ``B``) gives
``z_j = -g_j B / (sigma C)``: ``N(0, 1)`` for a canary that was not in the batch, ``N(1 / sigma, 1)`` for one
that was (under the claimed ``sigma``). An inserted canary is in a batch with probability ``q``, so the
log-likelihood ratio of "inserted" over "left out" for one step is ``log(1 - q + q exp(z / sigma -
1 / (2 sigma^2)))``, summed over the steps (the steps' noise is independent). It is the most powerful test
under the claim (Neyman-Pearson), so a claim that is too small shows through it first.
"""

import math

import torch
from torch import Tensor, nn


class CanaryModel(nn.Module):
    """``model`` plus a block of ``num_canaries`` parameters that only the canaries use (module docstring).

    Args:
        model: a classifier, ``(B, *input_shape)`` -> logits ``(B, num_classes)``.
        num_canaries: ``m`` >= 1, the block's size.
        input_shape: the shape of one input of ``model`` (without the batch dimension).
        num_classes: ``V`` >= 2, the number of logits.
        max_grad_norm: the clipping bound ``C`` the canaries must exceed.
        gradient_scale: a canary's gradient norm before clipping, in units of ``C`` (> 1).

    Input ``(B, prod(input_shape) + 1)`` float (:func:`pack`), output ``(B, V)`` logits.
    """

    def __init__(self, model: nn.Module, num_canaries: int, input_shape: tuple[int, ...], num_classes: int, *,
                 max_grad_norm: float, gradient_scale: float = 10.0):
        super().__init__()
        self.model = model
        self.num_canaries = num_canaries
        self.input_shape = tuple(input_shape)
        self.canary_block = nn.Embedding(num_canaries + 1, 1, padding_idx=num_canaries)
        nn.init.zeros_(self.canary_block.weight)
        # At w_j = 0 the canary's logits are all 0, softmax gives 1 / V, and its gradient is s (1 / V - 1).
        scale = gradient_scale * max_grad_norm / (1 - 1 / num_classes)
        direction = torch.zeros(num_classes)
        direction[0] = scale
        self.register_buffer("direction", direction)

    def forward(self, packed: Tensor) -> Tensor:
        x = packed[:, :-1].reshape(-1, *self.input_shape)
        ids = packed[:, -1].round().long()
        ordinary = (ids == self.num_canaries).to(x.dtype)
        return self.model(x) * ordinary[:, None] + self.canary_block(ids) * self.direction


def pack(inputs: Tensor, ids: Tensor) -> Tensor:
    """``(B, prod(input shape) + 1)``: each input flattened, its canary id (a float, exact below 2^24) appended."""
    return torch.cat([inputs.flatten(1), ids.to(inputs.dtype)[:, None]], dim=1)


class CanaryScores:
    """Accumulates each canary's log-likelihood ratio over the steps (module docstring).

    Args:
        num_canaries: ``m``.
        noise_multiplier: the claimed ``sigma`` > 0.
        sample_rate: the claimed ``q`` in (0, 1].
        max_grad_norm: ``C``.
        expected_batch_size: ``B``, the divisor of the noisy sum.
    """

    def __init__(self, num_canaries: int, *, noise_multiplier: float, sample_rate: float, max_grad_norm: float,
                 expected_batch_size: float):
        self.scale = expected_batch_size / (noise_multiplier * max_grad_norm)
        self.sigma = noise_multiplier
        self.log_q = math.log(sample_rate)
        self.log_not_q = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf
        self.scores = torch.zeros(num_canaries, dtype=torch.float64)
        self.steps = 0

    def update(self, block_grad: Tensor) -> None:
        """Adds one step, from the block's noisy gradient ``(m,)`` as the optimizer wrote it."""
        z = -block_grad.detach().to("cpu", torch.float64) * self.scale
        sampled = self.log_q + z / self.sigma - 1 / (2 * self.sigma ** 2)
        self.scores += torch.logaddexp(torch.full_like(z, self.log_not_q), sampled)
        self.steps += 1
