"""Pairwise reward-model losses and metrics: pure functions of tensors.

Bradley–Terry: P(chosen ≻ rejected) = σ(r_c − r_r), so the negative log-likelihood of the
human preference is −log σ(r_c − r_r) (InstructGPT, Ouyang et al. 2022, eq. 1). All inputs
are shaped (batch,) unless stated. No I/O, no config objects, nothing but torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor,
                  margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Bradley–Terry loss −log σ(r_c − r_r − margin); scalar.

    `margin` (batch,) asks the chosen reward to lead by at least that much, as Llama 2
    does with its annotator-confidence margin (Touvron et al. 2023, eq. 2). Omit it for plain BT.
    """
    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def centering_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """mean((r_c + r_r)²): pulls rewards towards zero mean, since BT only fixes differences
    (Eisenstein et al. 2023, "Helping or herding?"). Scalar; weight it with a coefficient."""
    return ((rewards_chosen + rewards_rejected) ** 2).mean()


def reward_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor,
                margin: torch.Tensor | None = None, center_coef: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and detached diagnostics (accuracy, mean margin, mean chosen/rejected reward)."""
    loss = pairwise_loss(rewards_chosen, rewards_rejected, margin)
    if center_coef:
        loss = loss + center_coef * centering_loss(rewards_chosen, rewards_rejected)
    with torch.no_grad():
        stats = {
            "accuracy": (rewards_chosen > rewards_rejected).float().mean(),
            "margin": (rewards_chosen - rewards_rejected).mean(),
            "rewards_chosen": rewards_chosen.mean(),
            "rewards_rejected": rewards_rejected.mean(),
        }
    return loss, stats


def preference_probability(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """P(chosen ≻ rejected) = σ(r_c − r_r), (batch,)."""
    return torch.sigmoid(rewards_chosen - rewards_rejected)


def expected_calibration_error(probs: torch.Tensor, n_bins: int = 10) -> torch.Tensor:
    """ECE of predicted preference probabilities against the human label "chosen wins".

    Every pair's true outcome is 1 (the human chose `chosen`), so each pair is symmetrised:
    it contributes (p, 1) and (1 − p, 0). Bins are equal-width on [0, 1]; ECE is the
    count-weighted mean |accuracy − confidence| over bins (Guo et al. 2017). Scalar.
    """
    p = torch.cat([probs, 1 - probs])
    y = torch.cat([torch.ones_like(probs), torch.zeros_like(probs)])
    bins = torch.clamp((p * n_bins).long(), max=n_bins - 1)
    ece = torch.zeros((), dtype=p.dtype)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.float().mean() * (y[in_bin].mean() - p[in_bin].mean()).abs()
    return ece
