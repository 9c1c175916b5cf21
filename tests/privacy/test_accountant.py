"""The accountant is dp-accounting's, fed the event the run's sampling matches."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedml_progfed.privacy.accountant import PrivacyAccountant, RoundEvent


def test_poisson_rounds_are_the_librarys_poisson_subsampled_gaussian_under_add_remove():
    ours = PrivacyAccountant(1.1, 1e-5, "poisson")
    for _ in range(400):
        ours.record(RoundEvent(60000, rate=256 / 60000))
    library = rdp_privacy_accountant.RdpAccountant()  # add/remove-one is its default relation
    library.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1)), 400))
    assert ours.epsilon() == pytest.approx(library.get_epsilon(1e-5), rel=1e-12)


def test_abadi_et_al_mnist_setting_is_within_the_published_bound():
    # DP-SGD on MNIST (q = 256/60000, sigma 1.1, 60 epochs, delta 1e-5): TF Privacy's tutorial prints
    # epsilon 2.92 with its coarser RDP orders; finer orders can only give the same or less.
    ours = PrivacyAccountant(1.1, 1e-5, "poisson")
    steps = 60 * 60000 // 256
    assert 2.3 < ours.epsilon({RoundEvent(60000, rate=256 / 60000): steps}) <= 2.92


def test_fixed_size_rounds_charge_replace_one_at_half_the_noise_multiplier():
    # replacing one client's clipped update moves the noised sum by up to 2C
    ours = PrivacyAccountant(1.0, 1e-4, "fixed")
    for _ in range(50):
        ours.record(RoundEvent(1000, sampled=100))
    library = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    library.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(1000, 100, dp_accounting.GaussianDpEvent(0.5)), 50))
    assert ours.epsilon() == pytest.approx(library.get_epsilon(1e-4), rel=1e-12)


def test_rounds_with_other_eligible_sets_compose_and_a_smaller_set_costs_more():
    wide, narrow = PrivacyAccountant(1.0, 1e-4, "fixed"), PrivacyAccountant(1.0, 1e-4, "fixed")
    for _ in range(10):
        wide.record(RoundEvent(100, sampled=10))
        narrow.record(RoundEvent(40, sampled=10))  # memory budgets left 40 eligible: rate 1/4, not 1/10
    assert narrow.epsilon() > wide.epsilon() > 0
    both = PrivacyAccountant(1.0, 1e-4, "fixed")
    for event in [RoundEvent(100, sampled=10), RoundEvent(40, sampled=10)] * 10:
        both.record(event)
    assert wide.epsilon() < both.epsilon() < wide.epsilon() + narrow.epsilon() + 1e-9


def test_state_round_trips_no_rounds_cost_nothing_and_no_noise_costs_everything():
    ours = PrivacyAccountant(0.8, 1e-5, "poisson", "pld")
    assert ours.epsilon() == 0.0
    ours.record(RoundEvent(500, rate=0.1))
    ours.record(RoundEvent(500, rate=0.1))
    again = PrivacyAccountant(0.8, 1e-5, "poisson", "pld")
    again.load_state_dict(ours.state_dict())
    assert again.epsilon() == ours.epsilon() > 0
    free = PrivacyAccountant(0.0, 1e-5, "fixed")
    free.record(RoundEvent(10, sampled=2))
    assert math.isinf(free.epsilon())
    with pytest.raises(ValueError, match="PLD accountant supports Poisson sampling only"):
        PrivacyAccountant(1.0, 1e-5, "fixed", "pld")
