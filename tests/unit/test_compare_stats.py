"""The statistics behind `rlhf compare`: outcomes, bootstrap CIs, length control, Bradley–Terry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.compare import (ELO_SCALE, bradley_terry, judge_agreement, length_controlled_win_rate, outcomes,
                          score_battles, win_rate_ci)


def test_outcomes_count_ties_within_the_margin_as_half():
    assert outcomes([1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 2.0, 0.45], tie_margin=0.1).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_win_rate_counts_ties_as_half():
    rate, (lo, hi) = win_rate_ci(np.array([1, 0.5, 0.5, 0.5, 0, 1, 0.5, 0.5]), n_resamples=200)
    assert rate == pytest.approx(4.5 / 8)
    assert lo < rate < hi


def test_win_rate_of_a_constant_outcome_is_a_point():
    assert win_rate_ci(np.full(10, 0.5)) == (0.5, (0.5, 0.5))


def test_bootstrap_ci_covers_a_known_win_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_p, trials, covered = 0.6, 200, 0
    for t in range(trials):
        x = (rng.random(150) < true_p).astype(float)
        _, (lo, hi) = win_rate_ci(x, n_resamples=400, seed=t)
        covered += lo <= true_p <= hi
    # Binomial(200, 0.95) lies within 0.90..0.99 with probability > 0.999.
    assert 0.90 <= covered / trials <= 0.99


def test_length_control_removes_a_pure_length_effect():
    rng = np.random.default_rng(1)
    n = 600
    len_a, len_b = rng.integers(10, 120, n) + 30, rng.integers(10, 120, n)
    # The judge likes longer answers and nothing else; a's answers are 30 words longer on average.
    delta = len_a - len_b
    x = (rng.random(n) < 1 / (1 + np.exp(-2 * np.tanh(delta / delta.std())))).astype(float)
    lc, (lo, hi) = length_controlled_win_rate(x, len_a, len_b, n_resamples=200)
    assert x.mean() > 0.6  # raw win-rate: "longer" looks like "better"
    assert abs(lc - 0.5) < 0.07 and lo < 0.5 < hi  # at equal length, no preference is left


def test_length_control_needs_lengths_that_differ():
    assert length_controlled_win_rate(np.array([1.0, 0.0, 1.0]), [5, 5, 5], [5, 5, 5]) is None


def simulate_battles(strengths: dict[str, float], prompts: int, seed: int):
    rng = np.random.default_rng(seed)
    names = list(strengths)
    battles = []
    for p in range(prompts):
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                win = 1 / (1 + math.exp(-(strengths[a] - strengths[b])))
                battles.append((p, a, b, float(rng.random() < win)))
    return battles


def test_bradley_terry_recovers_known_strengths():
    truth = {"sft": 0.0, "dpo": 0.6, "ppo": 1.2}
    board = bradley_terry(list(truth), simulate_battles(truth, prompts=600, seed=0), n_resamples=200)
    assert [r["model"] for r in board] == ["ppo", "dpo", "sft"]
    rating = {r["model"]: r["rating"] for r in board}
    for a, b in (("dpo", "sft"), ("ppo", "sft"), ("ppo", "dpo")):
        assert rating[a] - rating[b] == pytest.approx(ELO_SCALE * (truth[a] - truth[b]), abs=40)
    assert sum(rating.values()) / 3 == pytest.approx(1000)
    # The CIs do not overlap at this sample size, so every model gets its own rank.
    assert [r["rank"] for r in board] == [1, 2, 3]
    for r in board:
        assert r["ci95"][0] < r["rating"] < r["ci95"][1]


def test_bradley_terry_shares_a_rank_when_cis_overlap_and_ties_count_half():
    truth = {"a": 0.0, "b": 0.05, "c": 2.0}
    board = bradley_terry(list(truth), simulate_battles(truth, prompts=40, seed=1), n_resamples=200)
    ranks = {r["model"]: r["rank"] for r in board}
    assert ranks["c"] == 1 and ranks["a"] == ranks["b"] == 2
    all_ties = [(p, a, b, 0.5) for p in range(20) for a, b in (("a", "b"), ("a", "c"), ("b", "c"))]
    tied = bradley_terry(["a", "b", "c"], all_ties, n_resamples=100)
    assert all(r["rating"] == pytest.approx(1000, abs=1e-3) for r in tied)
    assert all(r["rank"] == 1 for r in tied)


def test_bradley_terry_stays_finite_when_one_model_wins_everything():
    battles = [(p, "a", "b", 1.0) for p in range(30)] + [(p, "b", "c", 1.0) for p in range(30)]
    board = bradley_terry(["a", "b", "c"], battles, n_resamples=100)
    assert all(math.isfinite(r["rating"]) and math.isfinite(r["ci95"][1]) for r in board)
    assert [r["model"] for r in board] == ["a", "b", "c"]


def test_judge_agreement_counts_battles_decided_alike():
    scores = {"x": [1.0, 2.0, 3.0], "y": [0.0, 3.0, 3.0]}
    gold = score_battles(["x", "y"], scores, 0.0)  # x wins, y wins, tie
    other = [(0, "y", "x", 0.0), (1, "x", "y", 1.0), (2, "x", "y", 0.5)]  # same, opposite, same
    [row] = judge_agreement({"gold": gold, "other": other})
    assert row == {"judges": ["gold", "other"], "agreement": pytest.approx(2 / 3), "n": 3}
