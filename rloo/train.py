"""`rlhf rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics") with TRL's RLOOTrainer.

    rlhf rloo                                   # sft:latest + reward:latest + prompts:latest -> checkpoints/rloo/vK
    rlhf rloo --config configs/rloo.yaml num_generations=8 beta=0.02

Each completion's advantage is its reward minus the mean reward of the other completions of the
same prompt; the KL to the reference is a per-sequence penalty on the reward, as in the paper.
What it shares with `rlhf grpo` (prompts, reward model, adapter, publishing) is `rlhf/online.py`.
"""

from __future__ import annotations

from rlhf import online
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import RLOOConfig


def check(cfg: RLOOConfig, store: ArtifactStore) -> online.Inputs:
    import trl

    return online.check(cfg, store, trl.RLOOConfig, stage="RLOO")


def main(cfg: RLOOConfig, store: ArtifactStore, score: online.ScoreFn | None = None) -> Artifact | None:
    import trl

    inputs = check(cfg, store) if score is None else None
    return online.train(cfg, store, "rloo", trl.RLOOTrainer, trl.RLOOConfig, score=score, inputs=inputs)
