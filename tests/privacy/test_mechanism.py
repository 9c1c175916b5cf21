"""The server's half of DP-FedAvg: a secret draw, noise once per round at z C, a fixed denominator."""

from __future__ import annotations

import math

import pytest
import torch

from fedml_progfed.privacy import ClientLevelDP, PrivacySettings


def settings(**changes) -> PrivacySettings:
    base = dict(clip=1.0, noise_multiplier=0.8, delta=1e-5, target_epsilon=None, sampling="fixed", per_round=4,
                client_rate=0.2, noise_seed=11)
    base.update(changes)
    return PrivacySettings(**base)


SHAPES = {"w": torch.Size([200, 50]), "b": torch.Size([50])}


def test_noise_is_drawn_once_per_round_with_standard_deviation_z_c_over_the_denominator():
    dp = ClientLevelDP(settings())
    draws = []
    for round_idx in range(40):
        assert len(dp.participants(range(20), round_idx)) == 4
        draws.append(torch.cat([t.flatten() for t in dp.noised_mean(round_idx, list(SHAPES), [], SHAPES).values()]))
    noise = torch.stack(draws).double()
    # 40 rounds x 10050 coordinates: mean 0 and std z C / 4 = 0.2 within a few standard errors
    assert abs(float(noise.mean())) < 4 * 0.2 / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(0.2, rel=0.01)
    # independent across rounds (drawn once per round, not reused)
    assert abs(float(torch.corrcoef(noise[:2])[0, 1])) < 0.05
    # and the same round's draw is the same bits on a second call (every runtime agrees)
    assert torch.equal(dp.noised_mean(3, list(SHAPES), [], SHAPES)["w"].flatten(), draws[3][: 200 * 50])


def test_the_denominator_is_fixed_before_updates_arrive_and_updates_are_clipped_on_the_server():
    dp = ClientLevelDP(settings(noise_multiplier=0.0))
    dp.participants(range(20), 0)
    big = {"w": torch.full(SHAPES["w"], 10.0), "b": torch.zeros(SHAPES["b"])}
    small = {"w": torch.full(SHAPES["w"], 1e-4), "b": torch.zeros(SHAPES["b"])}
    three = dp.noised_mean(0, list(SHAPES), [(0, small), (1, small), (2, big)], SHAPES)
    two = dp.noised_mean(0, list(SHAPES), [(0, small), (1, small)], SHAPES)  # client 2 dropped
    # the dropped client's clipped update over 4 (the expected participants), nothing rescaled
    difference = three["w"] - two["w"]
    assert torch.allclose(difference, torch.full(SHAPES["w"], 1.0 / math.sqrt(200 * 50) / 4), rtol=1e-4)
    assert torch.allclose(two["w"], torch.full(SHAPES["w"], 2e-4 / 4))


def test_fixed_and_poisson_draws_come_from_the_secret_and_charge_the_eligible_set():
    fixed = ClientLevelDP(settings())
    picks = {fixed.participants(range(10, 30), r) for r in range(30)}
    assert len(picks) > 20 and all(len(p) == 4 and set(p) <= set(range(10, 30)) for p in picks)
    other = ClientLevelDP(settings(noise_seed=12))
    assert [other.participants(range(10, 30), r) for r in range(5)] != [ClientLevelDP(settings()).participants(range(10, 30), r) for r in range(5)]
    poisson = ClientLevelDP(settings(sampling="poisson", client_rate=0.25))
    sizes = [len(poisson.participants(range(200), r)) for r in range(60)]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05) and len(set(sizes)) > 5
    assert poisson.accountant.state_dict() == [[200, 0, 0.25, 60]]


def test_a_round_past_the_target_trains_nobody_and_costs_nothing():
    dp = ClientLevelDP(settings(target_epsilon=3.0, noise_multiplier=3.0, per_round=5))
    trained = [r for r in range(200) if dp.participants(range(50), r)]
    assert trained == list(range(len(trained))) and 0 < len(trained) < 200
    assert dp.epsilon() <= 3.0 and dp.stopped_at == len(trained)
    assert dp.settings.largest_rounds(50, 3.0) == len(trained)


def test_the_state_a_checkpoint_keeps_gives_the_same_draws_and_epsilon():
    dp = ClientLevelDP(settings(noise_seed=None))
    for r in range(3):
        dp.participants(range(20), r)
    back = ClientLevelDP(settings(noise_seed=None))
    back.load_state_dict(dp.state_dict())
    assert back.secret == dp.secret and back.epsilon() == dp.epsilon()
    assert back.participants(range(20), 3) == dp.participants(range(20), 3)
    assert torch.equal(back.noised_mean(3, ["b"], [], SHAPES)["b"], dp.noised_mean(3, ["b"], [], SHAPES)["b"])


def test_the_smallest_noise_that_fits_does_fit_and_a_hundredth_less_does_not():
    s = settings(per_round=10)
    z = s.smallest_noise(30, 100, 5.0)
    fits = lambda value: PrivacySettings(**{**s.__dict__, "noise_multiplier": value}).planned_epsilon(30, 100) <= 5.0
    assert fits(z) and not fits(z - 0.01)


def test_adaptive_clipping_moves_the_bound_to_the_target_quantile_and_pays_with_the_updates_noise():
    s = settings(noise_multiplier=1.0, clip_quantile=0.5, clip_lr=0.2, count_noise=2.0, clip=0.1, per_round=20)
    # the pair (update, count) costs one Gaussian of multiplier z: z_delta^-2 + (2 sigma_b)^-2 = z^-2
    assert s.update_noise_multiplier ** -2 + (2 * 2.0) ** -2 == pytest.approx(1.0)
    dp = ClientLevelDP(s)
    generator = torch.Generator().manual_seed(0)
    for round_idx in range(150):
        chosen = dp.participants(range(100), round_idx)
        # the clients' update norms are spread over [0.5, 1.5]: their median is 1
        updates = [(c, {"b": torch.full(SHAPES["b"], float(0.5 + torch.rand((), generator=generator)) / math.sqrt(50))})
                   for c in chosen]
        dp.noised_mean(round_idx, ["b"], updates, SHAPES)
    assert dp.clip == pytest.approx(1.0, abs=0.15)
    back = ClientLevelDP(s)
    back.load_state_dict(dp.state_dict())
    assert back.clip == dp.clip
