"""PPO math for RLHF: pure functions of tensors.

Follows InstructGPT (Ouyang et al. 2022, eq. 2: reward = r_θ(x, y) − β·log(π/π_ref)), PPO
(Schulman et al. 2017, eq. 7 clipped surrogate), GAE (Schulman et al. 2016, eq. 16) and the
conventions of OpenAI's lm-human-preferences as documented in "The N+ Implementation Details
of RLHF with PPO: A Case Study on TL;DR Summarization" (Huang et al. 2024) and its reference
code (vwxyzjn/summarize_from_feedback_details, ppo.py).

Conventions, everywhere in this module:
- Tensors are shaped (batch, response_len) unless stated: one row per response, one column
  per generated token.
- `mask` is nonzero (1.0) on real response tokens and 0 on padding. It is a prefix of each
  row: the response, then padding. Rows may have different lengths, including 0.
- Whatever sits under mask = 0 is ignored and may be garbage (inf, NaN): it never reaches a
  result, and it gets zero gradient.
- Every reduction is over valid tokens of the whole batch ("token-level" means), as in the
  N+ details' `masked_mean`.

No I/O, no config objects, nothing but torch. `logprobs_from_logits` is defined once, in
`rlhf/sampling.py` (itself torch only), because every sampler needs it; it is part of this
module's API all the same.
"""

from __future__ import annotations

import torch

from rlhf.sampling import logprobs_from_logits  # noqa: F401  (re-exported: core's API)


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()


def _zero_masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # masked_fill, not x * mask: padding may hold inf or NaN, and inf * 0 is NaN.
    return x.masked_fill(~keep, 0)


# --------------------------------------------------------------------------- reductions

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is nonzero.

    x, mask: the same shape, any rank. dim=None reduces everything to a scalar; an int
    reduces that dimension only (e.g. dim=1 gives one mean per row, shape (batch,)).

    Where there is no valid position (an all-masked row, or an all-zero mask) the mean is
    0, not NaN: an empty response contributes nothing, and a loss over it must stay finite.
    """
    keep = _valid(mask)
    total = _zero_masked(x, keep).sum() if dim is None else _zero_masked(x, keep).sum(dim)
    count = keep.sum() if dim is None else keep.sum(dim)
    count = count.to(total.dtype)
    # total is already 0 where count is 0, so dividing by 1 there yields 0.
    return total / count.masked_fill(count == 0, 1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all valid positions of the batch; scalar.

    x, mask: the same shape, any rank. With `unbiased` the Bessel factor n / (n − 1) is
    applied, n being the number of valid positions, as TRL's and the N+ details' `masked_var`
    do. Fewer than two valid positions carry no measurable spread, so the result is 0 there
    (TRL raises instead; a 0 keeps `masked_whiten` finite on tiny batches).
    """
    keep = _valid(mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if not unbiased:
        return var
    n = keep.sum().to(var.dtype)
    return torch.where(n > 1, var * n / (n - 1).clamp(min=1), torch.zeros_like(var))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) with mean and var over the valid positions of the whole
    batch; same shape as `x`, 0 at masked positions.

    x, mask: the same shape, typically (batch, response_len). Statistics are global, not per
    row, as in lm-human-preferences' `whiten` and the N+ details' `masked_whiten`; the 1e-8
    is theirs too. The variance is unbiased (TRL, N+ details; lm-human-preferences used the
    biased one, a negligible difference at thousands of tokens).

    shift_mean=False adds the mean back, so only the scale changes: the N+ details whiten
    rewards this way, keeping their sign, and advantages with shift_mean=True.
    """
    keep = _valid(mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, keep)


# --------------------------------------------------------------------------- rewards and advantages

def kl_penalized_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float | torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −kl_coef · KL on every valid token, plus the reward-model score on
    the last valid token of each row (InstructGPT eq. 2; N+ details, "compute rewards").

    score: (batch,), the reward model's scalar per response.
    logprobs, ref_logprobs, mask: (batch, response_len), log-probabilities of the sampled
    tokens under the policy and the reference policy.

    Returns (rewards, kl), both (batch, response_len) and 0 at masked positions. kl is the
    per-token sample estimate log π(y_t) − log π_ref(y_t) (the "k1" estimator that
    lm-human-preferences uses), which is unbiased for KL(π‖π_ref) summed over a response.
    A row with no valid token gets no score: there is no token to credit it to.
    """
    keep = _valid(mask)
    kl = _zero_masked(logprobs - ref_logprobs, keep)
    rewards = -kl_coef * kl

    # Index of the last valid token per row; -1 for an empty row. Found from the mask
    # itself rather than from mask.sum() - 1 so a row's length needs no separate bookkeeping.
    positions = torch.arange(keep.size(1), device=keep.device).expand_as(keep)
    last = positions.masked_fill(~keep, -1).max(dim=1).values
    has_token = last >= 0
    credited = score.to(rewards.dtype).masked_fill(~has_token, 0)
    rewards = rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), credited.unsqueeze(1))
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), token by token.

    rewards, values, mask: (batch, response_len). values are the value head's predictions
    V(s_t) at rollout time; pass them detached (the references run this under no_grad).

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t),   A_t = δ_t + γλ·A_{t+1}

    The episode ends at each row's last valid token, so V beyond it is 0 and A_{t+1} there is
    0. Returns (advantages, returns), both (batch, response_len) and 0 at masked positions;
    returns = advantages + values are the value head's regression targets (TD(λ) returns).

    Vectorised over the batch: one reverse pass over time steps, as in lm-human-preferences.
    A 0 inside a row would also end the episode there; the mask is expected to be a prefix.
    """
    keep = _valid(mask)
    rewards = _zero_masked(rewards, keep)
    values = _zero_masked(values, keep)
    n_steps = rewards.size(1)
    next_advantage = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(n_steps)):
        # Padding values were zeroed above, so the step after a row's last token is worth 0.
        next_values = values[:, t + 1] if t + 1 < n_steps else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        next_advantage = _zero_masked(delta + gamma * lam * next_advantage, keep[:, t])
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = _zero_masked(advantages + values, keep)
    return advantages, returns


# --------------------------------------------------------------------------- losses

def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7, negated to minimise); scalar.

    logprobs: (batch, response_len), current policy, with grad.
    old_logprobs, advantages, mask: (batch, response_len), from the rollout.

        ratio = exp(logprobs − old_logprobs)
        loss  = masked_mean(max(−A·ratio, −A·clip(ratio, 1 − cliprange, 1 + cliprange)))

    The max is the pessimistic bound: clipping can only remove incentive, never add it.
    stats, detached scalars (N+ details' names):
    - clipfrac: fraction of valid tokens where the clipped term was chosen
      (−A·clipped > −A·ratio), i.e. where the gradient is cut off;
    - approx_kl: masked_mean(0.5·(logprobs − old_logprobs)²), the "k2" estimator of
      KL(π_old‖π) the N+ details log;
    - ratio: masked mean of the ratio.
    """
    keep = _valid(mask)
    # Zero the log-ratio before exp: garbage logprobs in padding would overflow to inf, and
    # inf times a zero gradient is NaN in backward.
    logratio = _zero_masked(logprobs - old_logprobs, keep)
    advantages = _zero_masked(advantages, keep)
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * logratio ** 2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, cliprange_value: float
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of lm-human-preferences / N+ details; scalar.

    values: (batch, response_len), current value head, with grad.
    old_values, returns, mask: (batch, response_len), from the rollout and `gae`.

        v_clipped = old_values + clip(values − old_values, −c, c)
        loss      = 0.5 · masked_mean(max((values − returns)², (v_clipped − returns)²))

    Like the policy clip, the max keeps the value head from moving more than c per rollout
    in a direction that lowers the loss. stats: vf_clipfrac, the detached fraction of valid
    tokens where the clipped error was the larger one.
    """
    keep = _valid(mask)
    values = _zero_masked(values, keep)
    old_values = _zero_masked(old_values, keep)
    returns = _zero_masked(returns, keep)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)}
    return loss, stats


# --------------------------------------------------------------------------- diagnostics

def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[returns − values] / Var[returns] over valid tokens; scalar.

    values, returns, mask: (batch, response_len). 1 is a perfect value head, 0 is no better
    than predicting the mean return, negative is worse than that. Both variances are biased
    (the Bessel factor cancels). If the returns have no variance the ratio is undefined;
    0 is returned rather than NaN (stable-baselines returns NaN there).
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    safe = var_returns.masked_fill(var_returns == 0, 1)
    return torch.where(var_returns > 0, 1 - var_residual / safe, torch.zeros_like(var_returns))


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy H(softmax(logits)) over valid tokens; scalar, in nats.

    logits: (batch, T, vocab); mask: (batch, T). Logits of −inf (banned tokens) are allowed:
    their p·log p is taken as 0, its limit, instead of 0·(−inf) = NaN.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    plogp = p * logp.masked_fill(p == 0, 0)
    return masked_mean(-plogp.sum(-1), mask)


# --------------------------------------------------------------------------- KL coefficient

class AdaptiveKLController:
    """Proportional controller for kl_coef (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences"; lm-human-preferences `AdaptiveKLController`).

        error   = clip(current_kl / target − 1, −0.2, 0.2)
        kl_coef ← kl_coef · (1 + error · n_steps / horizon)

    `current_kl` is the mean KL per response (summed over tokens), `n_steps` the number of
    responses since the last update (lm-human-preferences passes the batch size).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Move the coefficient towards the target KL; returns the new value."""
        # The ±0.2 clip bounds the step however far off target the KL is, so one noisy
        # batch cannot swing the coefficient.
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant kl_coef with the AdaptiveKLController interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """No-op; returns the unchanged value."""
        return self.value
