"""ppo/core.py against values worked out by hand.

Padding positions (mask 0) are filled with junk (99, inf, NaN) wherever it costs nothing,
to show it never leaks into a result.
"""

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

import ppo.core
import rlhf.sampling
from ppo.core import (AdaptiveKLController, FixedKLController, entropy_from_logits, explained_variance, gae,
                      kl_penalized_rewards, logprobs_from_logits, masked_mean, masked_var, masked_whiten,
                      ppo_policy_loss, ppo_value_loss)

NAN, INF = float("nan"), float("inf")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, atol=1e-7):
    # torch.allclose rather than torch.testing.assert_close: the latter's first call costs
    # most of a second in lazy imports.
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert expected.shape == actual.shape or expected.dim() == 0, f"shape {actual.shape} != {expected.shape}"
    assert torch.allclose(actual, expected, rtol=1e-6, atol=atol), f"{actual} != {expected}"


# --------------------------------------------------------------------------- masked statistics

def test_masked_mean_over_everything_per_row_and_with_an_all_masked_row():
    x = t([1.0, 2.0, NAN], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0])
    mask = t([1, 1, 0], [1, 0, 1], [0, 0, 0])
    # All valid tokens: 1, 2, 4, 6 -> 13 / 4.
    close(masked_mean(x, mask), 3.25)
    # Per row: (1 + 2) / 2 = 1.5; (4 + 6) / 2 = 5; the empty row is 0, not NaN.
    close(masked_mean(x, mask, dim=1), [1.5, 5.0, 0.0])
    # Per column: (1 + 4) / 2, 2 / 1, 6 / 1.
    close(masked_mean(x, mask, dim=0), [2.5, 2.0, 6.0])


def test_masked_mean_of_an_all_zero_mask_is_zero_and_its_gradient_finite():
    x = t([INF, NAN]).requires_grad_()
    m = masked_mean(x, t([0, 0]))
    m.backward()
    assert m.item() == 0.0
    close(x.grad, [[0.0, 0.0]])


def test_masked_var_biased_and_unbiased():
    # Valid 1, 2, 3: mean 2, squared deviations 1 + 0 + 1 = 2; biased 2 / 3, unbiased 2 / 2.
    x, mask = t([1.0, 2.0, 99.0], [3.0, NAN, -5.0]), t([1, 1, 0], [1, 0, 0])
    close(masked_var(x, mask, unbiased=False), 2 / 3)
    close(masked_var(x, mask), 1.0)


def test_masked_var_with_fewer_than_two_valid_tokens_is_zero():
    # One token: the biased variance is 0, the unbiased one 0/0; both are reported as 0.
    x = t([5.0, 99.0])
    close(masked_var(x, t([1, 0])), 0.0)
    close(masked_var(x, t([1, 0]), unbiased=False), 0.0)
    close(masked_var(x, t([0, 0])), 0.0)


def test_masked_whiten_uses_global_statistics_over_valid_tokens():
    x = t([0.0, 2.0, 100.0], [4.0, -7.0, NAN], [INF, 1.0, 1.0])
    mask = t([1, 1, 0], [1, 0, 0], [0, 0, 0])
    # Valid 0, 2, 4 across rows: mean 2, unbiased var (4 + 0 + 4) / 2 = 4, std 2,
    # so they whiten to -1, 0, 1; padding and the all-masked row give 0.
    close(masked_whiten(x, mask), t([-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]))
    # shift_mean=False adds the mean 2 back: -1 + 2, 0 + 2, 1 + 2.
    close(masked_whiten(x, mask, shift_mean=False), t([1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]))


def test_masked_whiten_edge_cases_stay_finite():
    # A single valid token: var is 0, x - mean is 0, so 0 * rsqrt(1e-8) = 0.
    close(masked_whiten(t([3.0, 99.0]), t([1, 0])), [[0.0, 0.0]])
    close(masked_whiten(t([3.0, 99.0]), t([1, 0]), shift_mean=False), [[3.0, 0.0]])
    # No valid token at all.
    close(masked_whiten(t([3.0, NAN]), t([0, 0])), [[0.0, 0.0]])


# --------------------------------------------------------------------------- rewards

def test_kl_penalized_rewards_puts_the_score_on_each_rows_last_valid_token():
    logprobs = t([-1.0, -2.0, -0.5], [-1.0, -3.0, NAN], [-1.0, 99.0, 99.0], [NAN, NAN, NAN])
    ref_logprobs = t([-1.5, -2.0, -1.0], [-0.5, -1.0, 0.0], [-1.2, 0.0, 0.0], [0.0, 0.0, 0.0])
    mask = t([1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0])
    score = torch.tensor([2.0, -1.0, 0.5, 7.0], dtype=torch.float64)
    rewards, kl = kl_penalized_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # kl = logprobs - ref_logprobs on valid tokens:
    #   row 0: -1 + 1.5 = 0.5, -2 + 2 = 0, -0.5 + 1 = 0.5
    #   row 1: -1 + 0.5 = -0.5, -3 + 1 = -2, padding 0
    #   row 2 (length 1): -1 + 1.2 = 0.2
    #   row 3 (empty): nothing
    close(kl, t([0.5, 0.0, 0.5], [-0.5, -2.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]))
    # rewards = -0.1 * kl, plus the score on the last valid token:
    #   row 0: -0.05, 0, -0.05 + 2 = 1.95
    #   row 1: 0.05, 0.2 - 1 = -0.8 (token 1 is its last, not token 2)
    #   row 2: -0.02 + 0.5 = 0.48
    #   row 3: no token to credit, so its score 7 is dropped.
    close(rewards, t([-0.05, 0.0, 1.95], [0.05, -0.8, 0.0], [0.48, 0.0, 0.0], [0.0, 0.0, 0.0]))


def test_kl_penalized_rewards_with_zero_kl_coef_is_the_score_alone():
    rewards, _ = kl_penalized_rewards(t(3.0), t([-1.0, -2.0]), t([-5.0, -5.0]), t([1, 1]), kl_coef=0.0)
    close(rewards, [[0.0, 3.0]])


# --------------------------------------------------------------------------- GAE

# One 3-token response used by the hand-computed GAE cases.
REWARDS, VALUES, FULL = t([0.1, 0.0, 1.0]), t([0.2, 0.4, 0.6]), t([1, 1, 1])


def test_gae_gamma_1_lam_095_by_hand():
    advantages, returns = gae(REWARDS, VALUES, FULL, gamma=1.0, lam=0.95)
    # delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last token = 0:
    #   delta_2 = 1.0 + 0   - 0.6 = 0.4
    #   delta_1 = 0.0 + 0.6 - 0.4 = 0.2
    #   delta_0 = 0.1 + 0.4 - 0.2 = 0.3
    # A_t = delta_t + gamma * lam * A_{t+1}, gamma * lam = 0.95:
    #   A_2 = 0.4
    #   A_1 = 0.2 + 0.95 * 0.4   = 0.58
    #   A_0 = 0.3 + 0.95 * 0.58  = 0.851
    close(advantages, [[0.851, 0.58, 0.4]])
    # returns = A + V: 1.051, 0.98, 1.0
    close(returns, [[1.051, 0.98, 1.0]])


def test_gae_gamma_05_lam_05_by_hand():
    advantages, returns = gae(REWARDS, VALUES, FULL, gamma=0.5, lam=0.5)
    #   delta_2 = 1.0 + 0.5 * 0   - 0.6 = 0.4
    #   delta_1 = 0.0 + 0.5 * 0.6 - 0.4 = -0.1
    #   delta_0 = 0.1 + 0.5 * 0.4 - 0.2 = 0.1
    # gamma * lam = 0.25:
    #   A_2 = 0.4;  A_1 = -0.1 + 0.25 * 0.4 = 0;  A_0 = 0.1 + 0.25 * 0 = 0.1
    close(advantages, [[0.1, 0.0, 0.4]])
    close(returns, [[0.3, 0.4, 1.0]])


def test_gae_with_lam_1_returns_are_the_discounted_reward_to_go():
    # lam = 1 telescopes the values away: returns_t = sum_k gamma^k r_{t+k}.
    # gamma = 1: 0.1 + 0 + 1 = 1.1, 0 + 1 = 1, 1.
    _, returns = gae(REWARDS, VALUES, FULL, gamma=1.0, lam=1.0)
    close(returns, [[1.1, 1.0, 1.0]])


def test_gae_ends_each_row_at_its_last_valid_token():
    rewards = t([0.0, 1.0, 9.0], [NAN, INF, 5.0], [2.0, 99.0, 99.0])
    values = t([0.5, 0.5, 9.0], [1.0, 2.0, 3.0], [0.5, 99.0, 99.0])
    mask = t([1, 1, 0], [0, 0, 0], [1, 0, 0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0, length 2 (the 9s in the tail must not count as the next value):
    #   delta_1 = 1.0 + 0 - 0.5 = 0.5;  delta_0 = 0.0 + 0.5 - 0.5 = 0
    #   A_1 = 0.5;  A_0 = 0 + 0.95 * 0.5 = 0.475;  returns 0.975, 1.0
    # Row 1, all masked: zeros.
    # Row 2, length 1: A_0 = 2.0 + 0 - 0.5 = 1.5, return 2.0.
    close(advantages, t([0.475, 0.5, 0.0], [0.0, 0.0, 0.0], [1.5, 0.0, 0.0]))
    close(returns, t([0.975, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]))


def _slow_gae(rewards, values, mask, gamma, lam):
    """The obvious version: one row at a time, only over that row's valid tokens."""
    advantages = torch.zeros_like(rewards)
    for i in range(rewards.size(0)):
        length = int(mask[i].sum())
        running = 0.0
        for step in reversed(range(length)):
            next_value = values[i, step + 1].item() if step + 1 < length else 0.0
            delta = rewards[i, step].item() + gamma * next_value - values[i, step].item()
            running = delta + gamma * lam * running
            advantages[i, step] = running
    return advantages, (advantages + values) * mask


def test_vectorised_gae_matches_a_per_row_loop_on_random_ragged_batches():
    gen = torch.Generator().manual_seed(0)
    batch, steps = 16, 9
    rewards = torch.randn(batch, steps, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, steps, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, steps + 1, (batch,), generator=gen)
    lengths[0], lengths[1], lengths[2] = 0, 1, steps
    mask = (torch.arange(steps) < lengths.unsqueeze(1)).to(torch.float64)
    # Junk beyond each response: the slow version never reads it, so neither may gae.
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    values = torch.where(mask.bool(), values, torch.full_like(values, -1e6))
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)]:
        expected_advantages, expected_returns = _slow_gae(rewards, values, mask, gamma, lam)
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        close(advantages, expected_advantages, atol=1e-10)
        close(returns, expected_returns, atol=1e-10)


# --------------------------------------------------------------------------- policy loss

def test_policy_loss_positive_advantage_ratio_e_is_clipped_to_1_plus_eps():
    logprobs = t([-1.0]).requires_grad_()
    # logprobs - old_logprobs = 1, so the ratio is e; A = 1:
    # -A * ratio = -e, -A * clip(e, 0.8, 1.2) = -1.2; max(-e, -1.2) = -1.2.
    loss, stats = ppo_policy_loss(logprobs, t([-2.0]), t([1.0]), t([1]), cliprange=0.2)
    close(loss, -1.2)
    close(stats["clipfrac"], 1.0)
    close(stats["ratio"], math.e)
    # approx_kl = 0.5 * 1^2.
    close(stats["approx_kl"], 0.5)
    # The clipped term is constant in logprobs: no incentive to move further.
    loss.backward()
    close(logprobs.grad, [[0.0]])


def test_policy_loss_negative_advantage():
    # Ratio e, A = -1: -A * ratio = e, -A * 1.2 = 1.2; max is e, the unclipped term:
    # a step that made a bad action more likely is never clipped away.
    loss, stats = ppo_policy_loss(t([-1.0]), t([-2.0]), t([-1.0]), t([1]), cliprange=0.2)
    close(loss, math.e)
    close(stats["clipfrac"], 0.0)
    # Ratio 1/e, A = -1: -A * ratio = 1/e ~ 0.368, -A * clip(1/e, 0.8, 1.2) = 0.8; max is 0.8.
    loss, stats = ppo_policy_loss(t([-3.0]), t([-2.0]), t([-1.0]), t([1]), cliprange=0.2)
    close(loss, 0.8)
    close(stats["clipfrac"], 1.0)


def test_policy_loss_mean_clipfrac_and_approx_kl_over_valid_tokens():
    logprobs = t([-1.0, -1.0, -2.0, 50.0]).requires_grad_()
    old_logprobs = t([-2.0, -2.0, -2.0, -50.0])
    advantages = t([1.0, -1.0, 2.0, NAN])
    mask = t([1, 1, 1, 0])
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # Token 0: ratio e, A = 1  -> max(-e, -1.2) = -1.2   (clipped)
    # Token 1: ratio e, A = -1 -> max(e, 1.2)   = e      (not clipped)
    # Token 2: ratio 1, A = 2  -> max(-2, -2)   = -2     (a tie is not counted as clipped)
    # Token 3: padding; its log-ratio of 100 would overflow exp to e^100 if not masked.
    close(loss, (-1.2 + math.e - 2.0) / 3)
    close(stats["clipfrac"], 1 / 3)
    # approx_kl = mean(0.5 * [1, 1, 0]) = 1/3.
    close(stats["approx_kl"], 1 / 3)
    close(stats["ratio"], (math.e + math.e + 1.0) / 3)
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    # d/dlogprobs of -A * ratio / 3 is -A * ratio / 3: token 1 gives e/3, token 2 gives -2/3.
    close(logprobs.grad, [[0.0, math.e / 3, -2 / 3, 0.0]])


# --------------------------------------------------------------------------- value loss

def test_value_loss_takes_the_larger_of_clipped_and_unclipped_errors():
    values = t([1.5, 0.9, 1.5, NAN]).requires_grad_()
    old_values = t([1.0, 1.0, 1.0, 0.0])
    returns = t([2.0, 0.5, 1.0, 0.0])
    mask = t([1, 1, 1, 0])
    loss, stats = ppo_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # Token 0: moved +0.5, clipped to 1.0 + 0.2 = 1.2.
    #   (1.5 - 2)^2 = 0.25, (1.2 - 2)^2 = 0.64 -> 0.64 (clipped term wins)
    # Token 1: moved -0.1, within the range, so both errors are (0.9 - 0.5)^2 = 0.16.
    # Token 2: moved +0.5, clipped to 1.2.
    #   (1.5 - 1)^2 = 0.25, (1.2 - 1)^2 = 0.04 -> 0.25 (unclipped wins)
    # loss = 0.5 * (0.64 + 0.16 + 0.25) / 3 = 0.5 * 0.35 = 0.175
    close(loss, 0.175)
    close(stats["vf_clipfrac"], 1 / 3)
    loss.backward()
    # Token 0 is clipped, so no gradient; token 2: 0.5 * 2 * (1.5 - 1) / 3 = 1/6;
    # token 1: 0.5 * 2 * (0.9 - 0.5) / 3 = 0.4 / 3.
    close(values.grad, [[0.0, 0.4 / 3, 1 / 6, 0.0]])


# --------------------------------------------------------------------------- diagnostics

def test_explained_variance():
    returns = t([1.0, 2.0, 99.0], [3.0, 4.0, NAN])
    mask = t([1, 1, 0], [1, 1, 0])
    # Perfect prediction: the residual has no variance.
    close(explained_variance(returns.clone(), returns, mask), 1.0)
    # Predicting the mean 2.5 everywhere: the residual is returns - 2.5, same variance.
    close(explained_variance(torch.full_like(returns, 2.5), returns, mask), 0.0)
    # Predicting 1, 2, 3, 5: residual 0, 0, 0, -1, mean -0.25, variance (3 * 0.0625 + 0.5625) / 4 = 0.1875;
    # Var[returns] = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25; 1 - 0.1875 / 1.25 = 0.85.
    close(explained_variance(t([1.0, 2.0, 0.0], [3.0, 5.0, 0.0]), returns, mask), 0.85)
    # Constant returns: undefined, reported as 0 rather than NaN.
    close(explained_variance(t([1.0, 2.0]), t([3.0, 3.0]), t([1, 1])), 0.0)


LN2 = math.log(2)
# Position 0: uniform over 4 tokens. Position 1: logsumexp(ln 2, 0, 0, -inf) = ln 4,
# so the probabilities are 2/4, 1/4, 1/4, 0.
LOGITS = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [LN2, 0.0, 0.0, -INF], [5.0, 1.0, -3.0, 0.0]]],
                      dtype=torch.float64)


def test_logprobs_from_logits_gathers_log_softmax_at_the_labels():
    # Label 2 at position 0: ln 1/4; label 0 at position 1: ln 1/2.
    logprobs = logprobs_from_logits(LOGITS[:, :2], torch.tensor([[2, 0]]))
    close(logprobs, [[-2 * LN2, -LN2]])
    # Huge logits stay finite: logit 1000 vs 0 gives log(1 / (1 + e^-1000)) ~ 0 and -1000.
    huge = torch.tensor([[[1000.0, 0.0], [1000.0, 0.0]]], dtype=torch.float64)
    close(logprobs_from_logits(huge, torch.tensor([[0, 1]])), [[0.0, -1000.0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_are_logprobs_from_logits_with_its_gradient_in_fewer_passes(dtype, temperature):
    """`rlhf.sampling.token_logprobs`, PPO's log-probs: the plain formula's values bit for bit and
    its gradient to fp32 rounding, over more rows than one block of `LOGPROB_ROWS`, the logits untouched."""
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 37, generator=generator)).to(dtype)  # 15 rows: a block of 8 and one of 7
    labels = torch.randint(0, 37, (3, 5), generator=generator)
    weights = torch.randn(3, 5, generator=generator)  # an upstream gradient that differs by position
    assert 15 > rlhf.sampling.LOGPROB_ROWS
    plain, fused = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    expected = logprobs_from_logits(plain.float() / temperature, labels)
    got = rlhf.sampling.token_logprobs(fused, labels, temperature)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    (weights * expected).sum().backward()
    (weights * got).sum().backward()
    assert fused.grad.dtype == dtype and torch.equal(fused.detach(), logits)  # not scaled in place
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # fp32 rounding, then one bf16 rounding
    assert torch.allclose(fused.grad.float(), plain.grad.float(), rtol=tolerance, atol=tolerance)
    # The gradient is (onehot - softmax)·g / t: it sums to zero over the vocabulary.
    assert torch.allclose(fused.grad.float().sum(-1), torch.zeros(3, 5), atol=1e-5 if dtype == torch.float32 else 5e-2)


def test_entropy_from_logits():
    mask = t([1, 1, 0])
    # Uniform over 4: ln 4 = 2 ln 2. (2/4, 1/4, 1/4, 0): 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2,
    # with 0 * ln 0 taken as 0. Mean over the two valid positions: (2 + 1.5) / 2 ln 2 = 1.75 ln 2.
    logits = LOGITS.clone().requires_grad_()
    entropy = entropy_from_logits(logits, mask)
    close(entropy, 1.75 * LN2)
    close(entropy_from_logits(LOGITS[:, :1], t([1])), math.log(4))
    entropy.backward()
    assert torch.isfinite(logits.grad).all()
    close(entropy_from_logits(LOGITS, t([0, 0, 0])), 0.0)


# --------------------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_moves_proportionally_and_clips_at_02():
    # n_steps / horizon = 512 / 10000 = 0.0512.
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 6.6: error 6.6 / 6 - 1 = 0.1; factor 1 + 0.1 * 0.0512 = 1.00512.
    assert ctl.update(6.6, n_steps=512) == pytest.approx(0.1 * 1.00512)
    assert ctl.value == pytest.approx(0.100512)

    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    # KL 60: error 9, clipped to 0.2; factor 1 + 0.2 * 0.0512 = 1.01024.
    assert ctl.update(torch.tensor(60.0), 512) == pytest.approx(0.101024)
    # KL 0: error -1, clipped to -0.2; factor 0.98976, applied to the new value.
    assert ctl.update(0.0, 512) == pytest.approx(0.101024 * 0.98976)

    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    # On target: error 0, no change.
    assert ctl.update(6.0, 512) == pytest.approx(0.1)


def test_adaptive_kl_controller_rejects_nonpositive_target_or_horizon():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=6.0, horizon=0)


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05
    assert ctl.update(0.0, 512) == 0.05
    assert ctl.value == 0.05


# --------------------------------------------------------------------------- purity

def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """Dotted names of the modules a file imports: at any depth, or only those its import runs."""
    tree = ast.parse(path.read_text())
    imported = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would pull in project code"
            imported.add(node.module)
    return imported


def test_core_imports_nothing_but_torch_the_standard_library_and_the_torch_only_sampler():
    """core shares `logprobs_from_logits` with `rlhf.sampling`, whose import must load only torch too
    (its text-level helpers import a progress bar when called)."""
    pure = {"torch"} | set(sys.stdlib_module_names)
    core = imports_of(Path(ppo.core.__file__))
    sampling = imports_of(Path(rlhf.sampling.__file__), top_level_only=True)
    assert "torch" in core and "torch" in sampling
    assert {m.split(".")[0] for m in core if m != "rlhf.sampling"} <= pure, core
    assert {m.split(".")[0] for m in sampling} <= pure, sampling
