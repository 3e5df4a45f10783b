"""Privacy accounting for DP-SGD with Poisson sampling, through Opacus's accountants (never rewritten here).

A DP-SGD step is one Poisson-subsampled Gaussian mechanism: each example is in the logical batch with
probability ``sample_rate`` and the noise has std ``noise_multiplier * max_grad_norm``. A run is the list of
``(noise_multiplier, sample_rate, steps)`` it took; ``"rdp"`` (Rényi DP, Mironov et al.) and ``"prv"``
(privacy random variables, Gopi et al., tighter) turn it into ``epsilon`` at a given ``delta``.
"""

import math
import warnings
from typing import Literal

from persample.checks import check_delta, check_mechanism, check_noise_multiplier, check_sample_rate

Mechanism = Literal["rdp", "prv"]


class PrivacyAccountant:
    """Records the steps of a run and reports the epsilon spent.

    Args:
        mechanism: ``"rdp"`` (:class:`opacus.accountants.RDPAccountant`) or ``"prv"``
            (:class:`opacus.accountants.PRVAccountant`).

    Raises:
        ValueError: an unknown ``mechanism``.

    Examples:
        >>> import persample
        >>> accountant = persample.PrivacyAccountant("rdp")
        >>> accountant.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=600)
        >>> accountant.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=400)  # merged with the last entry
        >>> accountant.history, accountant.steps
        ([(1.0, 0.01, 1000)], 1000)
        >>> round(accountant.epsilon(1e-5), 1)
        2.1
        >>> prv = persample.PrivacyAccountant("prv")
        >>> prv.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
        >>> prv.epsilon(1e-5) < accountant.epsilon(1e-5)  # the same run, a tighter account
        True

    References:
        Mironov, "Rényi Differential Privacy", CSF 2017; Mironov, Talwar and Zhang, "Rényi Differential Privacy of
        the Sampled Gaussian Mechanism", 2019 (``"rdp"``); Gopi, Lee and Wutschitz, "Numerical Composition of
        Differential Privacy", NeurIPS 2021 (``"prv"``).
    """

    def __init__(self, mechanism: Mechanism = "rdp"):
        check_mechanism(mechanism)
        self.mechanism = mechanism
        # Imported here, not with persample: Opacus pulls in torch.distributed.tensor, most of a second of
        # `import persample` on two CPU cores.
        from opacus.accountants import create_accountant

        self._opacus = create_accountant(mechanism)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Records ``num_steps`` steps with the given ``noise_multiplier`` (>= 0) and ``sample_rate`` in (0, 1]."""
        check_noise_multiplier(noise_multiplier)
        check_sample_rate(sample_rate)
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        if num_steps == 0:
            return
        history = self._opacus.history
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + num_steps)
        else:
            history.append((noise_multiplier, sample_rate, num_steps))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``[(noise_multiplier, sample_rate, steps), ...]`` in the order taken (a copy)."""
        return list(self._opacus.history)

    def state_dict(self) -> dict:
        """``{"mechanism", "history"}``: what :meth:`load_state_dict` restores (a checkpoint of the run)."""
        return {"mechanism": self.mechanism, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        """Replaces the recorded steps by those of :meth:`state_dict`.

        Raises:
            ValueError: a state of the other mechanism.
        """
        if state_dict["mechanism"] != self.mechanism:
            raise ValueError(f"the state is of a {state_dict['mechanism']!r} accountant, this one is "
                             f"{self.mechanism!r}")
        self._opacus.history = [tuple(entry) for entry in state_dict["history"]]

    @property
    def steps(self) -> int:
        """Total steps recorded."""
        return sum(steps for _, _, steps in self._opacus.history)

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta`` in (0, 1): 0 before any step, inf if a step had no noise."""
        check_delta(delta)
        history = self._opacus.history
        if not history:
            return 0.0
        if any(noise_multiplier == 0 for noise_multiplier, _, _ in history):
            return math.inf
        return float(self._opacus.get_epsilon(delta=delta))


def epsilon_for(
    noise_multiplier: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    accountant: Mechanism = "rdp",
) -> float:
    """The epsilon at ``delta`` after ``steps`` DP-SGD steps at ``noise_multiplier`` and ``sample_rate``.

    Raises:
        ValueError: as :meth:`PrivacyAccountant.step` and :meth:`PrivacyAccountant.epsilon`, or an unknown
            ``accountant``.

    Examples:
        >>> import persample
        >>> round(persample.epsilon_for(1.0, 1e-5, 0.01, 1000), 1)  # noise_multiplier, delta, sample_rate, steps
        2.1
        >>> persample.epsilon_for(1.0, 1e-5, 0.01, 1000, accountant="prv") < 2.1
        True

    References:
        Mironov, "Rényi Differential Privacy", CSF 2017; Mironov, Talwar and Zhang, "Rényi Differential Privacy of
        the Sampled Gaussian Mechanism", 2019 (``"rdp"``); Gopi, Lee and Wutschitz, "Numerical Composition of
        Differential Privacy", NeurIPS 2021 (``"prv"``).
    """
    privacy = PrivacyAccountant(accountant)
    privacy.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
    return privacy.epsilon(delta)


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: Mechanism = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest ``noise_multiplier`` (to ``epsilon_tolerance``) whose run stays within ``target_epsilon``.

    Give either ``steps`` or ``epochs`` (``steps = int(epochs / sample_rate)``, Opacus's convention).
    Binary search by :func:`opacus.accountants.utils.get_noise_multiplier`.

    Raises:
        ValueError: ``target_epsilon`` not > 0, ``delta`` not in (0, 1), ``sample_rate`` not in (0, 1],
            neither or both of ``steps``/``epochs``, or a budget too small for any noise (Opacus's error).

    Examples:
        >>> import persample
        >>> sigma = persample.noise_multiplier_for(3.0, 1e-5, 0.01, epochs=10)  # 1000 steps
        >>> 2.9 < persample.epsilon_for(sigma, 1e-5, 0.01, 1000) <= 3.0
        True

    References:
        Mironov, "Rényi Differential Privacy", CSF 2017; Mironov, Talwar and Zhang, "Rényi Differential Privacy of
        the Sampled Gaussian Mechanism", 2019 (``"rdp"``); Gopi, Lee and Wutschitz, "Numerical Composition of
        Differential Privacy", NeurIPS 2021 (``"prv"``).
    """
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    check_delta(delta)
    check_sample_rate(sample_rate)
    check_mechanism(accountant)
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps and epochs, got steps={steps!r}, epochs={epochs!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The search tries noise levels far below the answer, where RDP's best order is the largest one
        # tried; Opacus warns about each such try, which says nothing about the result.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, epochs=epochs,
                                          accountant=accountant, epsilon_tolerance=epsilon_tolerance))


