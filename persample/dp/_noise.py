"""Gaussian noise for DP-SGD: the "add noise" step of clip -> sum -> add noise -> scale.

Two sources:

* a ``torch.Generator`` (or the global one): fast, reproducible with a seed, fine for research; its
  state is not secret-grade (Mersenne Twister on the CPU, Philox on CUDA).
* ``secure_mode=True``: every random bit comes from the operating system's CSPRNG (``os.urandom``),
  turned into normals by Box-Muller on 53-bit uniforms in float64. Floating-point Gaussian samplers leak
  through the uneven spacing of the values they can produce (Mironov 2012; Jin et al. 2021); as in Opacus,
  each value is the sum of four independent draws divided by two (Holohan et al. 2021, n = 2), which
  keeps the standard deviation and hides that structure. The cost is 32 bytes of OS randomness per value,
  drawn on the CPU; we chose this over seeding a ``torch.Generator`` from ``os.urandom`` because a
  Generator's 64-bit seed and predictable stream are not a cryptographic guarantee.
"""

import math
import os
from collections.abc import Mapping

import torch
from torch import Tensor


def gaussian_noise(
    shape: tuple[int, ...] | torch.Size,
    std: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> Tensor:
    """Samples ``N(0, std**2)`` of the given ``shape``, ``dtype`` and ``device``.

    With a ``generator`` the draw happens on the generator's device and is then moved to ``device``.
    ``std == 0`` gives zeros without drawing. ``secure_mode=True`` ignores ``generator`` (see the module
    docstring).

    Raises:
        ValueError: ``std`` negative or not finite; ``generator`` together with ``secure_mode``.

    Examples:
        >>> import torch
        >>> import persample
        >>> noise = persample.gaussian_noise((1000, 100), 2.0, generator=torch.Generator().manual_seed(0))
        >>> noise.shape, noise.dtype, round(noise.std().item(), 1)
        (torch.Size([1000, 100]), torch.float32, 2.0)
        >>> secure = persample.gaussian_noise((3,), 1.0, dtype=torch.float64, secure_mode=True)  # os.urandom
        >>> secure.dtype
        torch.float64

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (the Gaussian noise of DP-SGD).
        Secure mode: Mironov, "On Significance of the Least Significant Bits for Differential Privacy", CCS 2012
        (the attack on floating-point samplers); Holohan and Braghin, "Secure Random Sampling in Differential
        Privacy", ESORICS 2021 (the sum of draws that hides it).
    """
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    if secure_mode and generator is not None:
        raise ValueError("secure_mode=True draws from the OS CSPRNG: pass generator=None")
    if std == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    if secure_mode:
        numel = math.prod(shape)
        total = sum(_os_standard_normal(numel) for _ in range(4))
        return (total * (std / 2)).reshape(shape).to(device=device, dtype=dtype)
    draw_device = generator.device if generator is not None else device
    noise = torch.normal(0.0, std, size=tuple(shape), generator=generator, device=draw_device, dtype=dtype)
    return noise.to(device)


def add_noise(
    grads: Mapping[str, Tensor],
    std: float,
    *,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> dict[str, Tensor]:
    """``{name: g + N(0, std**2)}``: independent noise on every element, in each tensor's dtype and device.

    Raises:
        ValueError: as :func:`gaussian_noise`.

    Examples:
        >>> import torch
        >>> import persample
        >>> summed = {"w": torch.zeros(2, 3), "b": torch.zeros(2, dtype=torch.float64)}
        >>> noisy = persample.add_noise(summed, 1.0, generator=torch.Generator().manual_seed(0))
        >>> {name: (tuple(g.shape), g.dtype) for name, g in noisy.items()}
        {'w': ((2, 3), torch.float32), 'b': ((2,), torch.float64)}

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (the Gaussian noise of DP-SGD).
        Secure mode: Mironov, "On Significance of the Least Significant Bits for Differential Privacy", CCS 2012
        (the attack on floating-point samplers); Holohan and Braghin, "Secure Random Sampling in Differential
        Privacy", ESORICS 2021 (the sum of draws that hides it).
    """
    return {name: g + gaussian_noise(g.shape, std, device=g.device, dtype=g.dtype, generator=generator,
                                     secure_mode=secure_mode)
            for name, g in grads.items()}


def os_uniform(numel: int) -> Tensor:
    """``numel`` uniforms on ``(0, 1]`` in float64 from ``os.urandom``: 53 random bits each, the multiples of
    ``2**-53``, shifted up by one step so that ``log(u)`` is finite."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float64)
    bits = torch.frombuffer(bytearray(os.urandom(8 * numel)), dtype=torch.int64)
    return (((bits >> 11) & ((1 << 53) - 1)) + 1).double() * 2.0 ** -53


def _os_standard_normal(numel: int) -> Tensor:
    """``numel`` standard normals in float64 from ``os.urandom`` (Box-Muller)."""
    pairs = (numel + 1) // 2
    if pairs == 0:
        return torch.zeros(0, dtype=torch.float64)
    uniform = os_uniform(2 * pairs)
    radius = torch.sqrt(-2.0 * torch.log(uniform[:pairs]))
    angle = (2.0 * math.pi) * uniform[pairs:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:numel]
