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


def temperature_nll(margins: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean −log σ(Δ / T) of held-out margins Δ = r_c − r_r at temperature T; scalar."""
    return -F.logsigmoid(margins / temperature).mean()


def fit_temperature(margins: torch.Tensor, prior_pairs: int = 1, t_min: float = 0.05, t_max: float = 100.0,
                    steps: int = 60) -> float:
    """The temperature T in [t_min, t_max] that minimises `temperature_nll` (Guo et al. 2017).

    Temperature scaling divides every margin by one T, so ranking and accuracy stay as they
    are while σ(Δ / T) becomes a calibrated probability. `prior_pairs` pairs won and
    `prior_pairs` lost at the mean |Δ| join the fit, as in Laplace's rule of succession:
    without them a held-out set the model ranks perfectly drives T to 0 and every probability
    to 1. The NLL is convex in a = 1/T (each term −log σ(aΔ) is), so its minimum is where the
    derivative Σ −Δ σ(−aΔ) crosses zero, found by bisection. Margins with no signal (all zero,
    or mostly wrong) leave T at t_max: flat, never flipped.
    """
    margins = margins.double()
    typical = margins.abs().mean()
    margins = torch.cat([margins, typical.repeat(prior_pairs), -typical.repeat(prior_pairs)])
    grad = lambda a: float((-margins * torch.sigmoid(-a * margins)).mean())
    lo, hi = 1 / t_max, 1 / t_min
    if grad(lo) >= 0:
        return t_max
    if grad(hi) <= 0:
        return t_min
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if grad(mid) < 0 else (lo, mid)
    return 1 / ((lo + hi) / 2)
