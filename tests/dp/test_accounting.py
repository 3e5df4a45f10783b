"""persample.dp._accounting gives exactly what Opacus's accountants give for the same schedule."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import persample

SCHEDULES = {
    "constant": [(1.1, 0.01, 200)],
    "changing": [(0.8, 0.02, 50), (1.5, 0.02, 30), (1.5, 0.05, 20)],
}
OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_epsilon_equals_opacus(mechanism, schedule):
    ours, theirs = persample.PrivacyAccountant(mechanism), OPACUS[mechanism]()
    for noise_multiplier, sample_rate, steps in SCHEDULES[schedule]:
        ours.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
        for _ in range(steps):
            theirs.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    assert ours.history == theirs.history
    assert ours.steps == sum(steps for _, _, steps in SCHEDULES[schedule])
    for delta in (1e-5, 1e-3):
        assert ours.epsilon(delta) == pytest.approx(theirs.get_epsilon(delta), rel=1e-12)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # Opacus's own search, called directly
@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_noise_multiplier_for_equals_opacus_and_meets_the_target(mechanism):
    sigma = persample.noise_multiplier_for(2.0, 1e-5, 0.02, steps=300, accountant=mechanism)
    assert sigma == get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.02, steps=300,
                                         accountant=mechanism)
    assert persample.epsilon_for(sigma, 1e-5, 0.02, 300, accountant=mechanism) <= 2.0
    assert persample.epsilon_for(sigma * 0.95, 1e-5, 0.02, 300, accountant=mechanism) > 2.0 - 0.01


def test_epochs_are_steps_over_sample_rate():
    by_epochs = persample.noise_multiplier_for(3.0, 1e-5, 0.04, epochs=5)
    assert by_epochs == persample.noise_multiplier_for(3.0, 1e-5, 0.04, steps=int(5 / 0.04))


def test_no_steps_and_no_noise():
    privacy = persample.PrivacyAccountant("prv")
    assert privacy.epsilon(1e-5) == 0.0
    privacy.step(noise_multiplier=0.0, sample_rate=0.1)
    assert privacy.epsilon(1e-5) == math.inf


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_outside_zero_one(delta):
    with pytest.raises(ValueError, match="delta"):
        persample.PrivacyAccountant().epsilon(delta)
    with pytest.raises(ValueError, match="delta"):
        persample.noise_multiplier_for(1.0, delta, 0.1, steps=10)


@pytest.mark.parametrize("arguments, match", [
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"sample_rate": 1.1}, "sample_rate"),
    ({"steps": None}, "exactly one of steps and epochs"),
    ({"epochs": 2}, "exactly one of steps and epochs"),
    ({"steps": 0}, "steps"),
    ({"accountant": "gdp"}, "accountant"),
])
def test_bad_noise_multiplier_for(arguments, match):
    settings = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.1, "steps": 10, **arguments}
    with pytest.raises(ValueError, match=match):
        persample.noise_multiplier_for(**settings)


def test_bad_step():
    with pytest.raises(ValueError, match="noise_multiplier"):
        persample.PrivacyAccountant().step(noise_multiplier=-1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        persample.PrivacyAccountant().step(noise_multiplier=1.0, sample_rate=0.0)


def test_state_dict_round_trip():
    accountant = persample.PrivacyAccountant("rdp")
    accountant.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=30)
    accountant.step(noise_multiplier=0.9, sample_rate=0.02, num_steps=5)
    restored = persample.PrivacyAccountant("rdp")
    restored.load_state_dict(accountant.state_dict())
    assert restored.history == accountant.history and restored.epsilon(1e-5) == accountant.epsilon(1e-5)
    with pytest.raises(ValueError, match="'rdp' accountant"):
        persample.PrivacyAccountant("prv").load_state_dict(accountant.state_dict())
