"""reward/loss.py against values worked out by hand."""

import math

import pytest
import torch

from reward.loss import (centering_loss, expected_calibration_error, fit_temperature, pairwise_loss,
                         preference_probability, reward_loss, temperature_nll)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_pairwise_loss_is_minus_log_sigmoid_of_the_reward_gap():
    # gaps are 0 and ln 3: σ(0) = 1/2, σ(ln 3) = 3/4, so the loss is (ln 2 + ln 4/3) / 2.
    loss = pairwise_loss(t(1.0, math.log(3)), t(1.0, 0.0))
    assert loss.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)


def test_margin_demands_a_larger_gap():
    # gap 2, margin 2: the effective gap is 0, so the loss is ln 2 (as if the rewards were tied).
    assert pairwise_loss(t(3.0), t(1.0), margin=t(2.0)).item() == pytest.approx(math.log(2))
    # margin 0 is plain Bradley–Terry.
    assert pairwise_loss(t(3.0), t(1.0), margin=t(0.0)).item() == pytest.approx(pairwise_loss(t(3.0), t(1.0)).item())


def test_centering_term_is_mean_squared_sum():
    # (1 + -1)^2 = 0 and (2 + 1)^2 = 9, mean 4.5.
    assert centering_loss(t(1.0, 2.0), t(-1.0, 1.0)).item() == pytest.approx(4.5)


def test_reward_loss_adds_weighted_centering_and_reports_detached_stats():
    r_c, r_r = t(2.0, 0.0), t(0.0, 1.0)
    loss, stats = reward_loss(r_c.requires_grad_(), r_r, center_coef=0.1)
    bt = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(bt + 0.1 * (4 + 1) / 2)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == pytest.approx(0.5)  # (2 + -1) / 2
    assert not any(v.requires_grad for v in stats.values())


def test_preference_probability_of_a_gap_of_ln3_is_three_quarters():
    assert preference_probability(t(math.log(3)), t(0.0)).item() == pytest.approx(0.75)


def test_ece_is_zero_when_confidence_matches_outcomes_and_large_when_overconfident():
    # A model that says 0.5 for every pair is perfectly calibrated after symmetrisation.
    assert expected_calibration_error(t(0.5, 0.5, 0.5)).item() == pytest.approx(0.0)
    # Says 0.95 for chosen: the bin 0.9–1.0 holds (0.95, 1) only, bin 0.0–0.1 holds (0.05, 0):
    # each bin's gap is 0.05 and each holds half the points, so ECE = 0.05.
    assert expected_calibration_error(t(0.95, 0.95)).item() == pytest.approx(0.05)
    # Says 0.05 for chosen (confidently wrong): gaps are 0.95, so ECE = 0.95.
    assert expected_calibration_error(t(0.05)).item() == pytest.approx(0.95)


def test_fit_temperature_recovers_the_temperature_that_generated_the_outcomes():
    """Margins drawn at scale 3, outcomes drawn from σ(Δ / 2): the fitted T is about 2, and
    calibrating with it lowers the ECE; the NLL at the fitted T is below that at T = 1 and at 2T."""
    g = torch.Generator().manual_seed(0)
    true_margin = torch.randn(20_000, generator=g) * 3
    chosen_wins = torch.rand(20_000, generator=g) < torch.sigmoid(true_margin / 2)
    margins = torch.where(chosen_wins, true_margin, -true_margin)  # r_c − r_r from the human's side
    temperature = fit_temperature(margins)
    assert temperature == pytest.approx(2.0, rel=0.05)
    nll = temperature_nll(margins, temperature)
    assert nll < temperature_nll(margins, 1.0) and nll < temperature_nll(margins, 2 * temperature)
    before = expected_calibration_error(torch.sigmoid(margins))
    after = expected_calibration_error(torch.sigmoid(margins / temperature))
    assert before > 0.05 and after < 0.01


def test_fit_temperature_stays_in_bounds_on_degenerate_margins():
    # Ranked perfectly: confident, but not certain (about 4 of 5 with one prior pair won and one lost).
    separable = t(1.0, 2.0, 0.5)
    temperature = fit_temperature(separable)
    assert 0.05 < temperature < 100
    assert 0.7 < torch.sigmoid(separable.mean() / temperature) < 0.95
    assert fit_temperature(separable, prior_pairs=0) == 0.05  # without the prior: as confident as allowed
    assert fit_temperature(t(0.0, 0.0)) == 100.0  # no signal: as flat as allowed
    assert fit_temperature(t(-1.0, -2.0)) == 100.0  # all wrong: flatten, never flip the sign


def test_a_reward_checkpoints_preference_probability_is_calibrated_and_never_overflows():
    from rlhf.judges import RewardModel

    judge = object.__new__(RewardModel)  # the arithmetic only: no checkpoint to load
    judge.std, judge.temperature = 2.0, 4.0
    # Normalised scores 1 apart are raw rewards 2 apart; at T = 4 that is σ(0.5).
    assert judge.preference_probability(1.0, 0.0) == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert judge.preference_probability(0.0, 1.0) == pytest.approx(1 - judge.preference_probability(1.0, 0.0))
    judge.temperature = 0.05  # a confident model: a margin that overflows exp() in the naive formula
    assert judge.preference_probability(1000.0, 0.0) == 1.0 and judge.preference_probability(0.0, 1000.0) == 0.0
