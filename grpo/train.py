"""`rlhf grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) with TRL's GRPOTrainer.

    rlhf grpo                                   # sft:latest + reward:latest + prompts:latest -> checkpoints/grpo/vK
    rlhf grpo --config configs/grpo.yaml trl.loss_type=dr_grpo trl.scale_rewards=none

Each completion's advantage is its reward minus the mean of its prompt's group, divided by the
group's std (TRL's default `scale_rewards=group`); the KL to the reference is a term of the
per-token loss, as in the paper. What it shares with `rlhf rloo` is `rlhf/online.py`.
"""

from __future__ import annotations

from rlhf import online
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import GRPOConfig


def check(cfg: GRPOConfig, store: ArtifactStore) -> online.Inputs:
    import trl

    return online.check(cfg, store, trl.GRPOConfig, stage="GRPO")


def main(cfg: GRPOConfig, store: ArtifactStore, score: online.ScoreFn | None = None) -> Artifact | None:
    import trl

    inputs = check(cfg, store) if score is None else None
    return online.train(cfg, store, "grpo", trl.GRPOTrainer, trl.GRPOConfig, score=score, inputs=inputs)
