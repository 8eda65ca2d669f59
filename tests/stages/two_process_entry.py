"""What `accelerate launch` runs in tests/stages/test_distributed.py: a stage, with each process's training rows traced.

    python two_process_entry.py TRACE_DIR cli --workspace WS STAGE KEY=VALUE ...
    python two_process_entry.py TRACE_DIR ppo-toy WS TARGET_TOKEN KEY=VALUE ...

Every training batch a process takes is appended to TRACE_DIR/rank-<RANK>.jsonl (one line per
row: a hash of its tokens), so a test can check the processes trained on different shards.
`ppo-toy` runs PPO on a toy reward (the share of TARGET_TOKEN in a reply), which needs no
reward checkpoint and rises when PPO learns.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

TRACE = Path(".")
RANK = int(os.environ.get("RANK", "0"))


def row_hash(row) -> str:
    return hashlib.sha1(json.dumps(row).encode()).hexdigest()


def trace(rows: list) -> None:
    with open(TRACE / f"rank-{RANK}.jsonl", "a") as f:
        f.writelines(json.dumps(row_hash(row)) + "\n" for row in rows)


def trace_trainer_batches() -> None:
    """Wrap transformers' Trainer.training_step, which TRL's trainers call for every batch."""
    import transformers

    step = transformers.Trainer.training_step

    def traced(self, model, inputs, *args, **kwargs):
        pad = self.processing_class.pad_token_id
        key = next(k for k in ("input_ids", "chosen_input_ids", "input_ids_chosen", "prompt_input_ids") if k in inputs)
        trace([[t for t in row if t != pad] for row in inputs[key].tolist()])
        return step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = traced


def ppo_toy(ws: str, target: int, overrides: list[str]) -> int:
    import ppo.train
    from rlhf.artifacts import ArtifactStore
    from rlhf.config import PPOConfig, load_config

    batch = ppo.train._prompt_batch

    def traced(*args, **kwargs):
        prompts = batch(*args, **kwargs)
        trace(prompts)
        return prompts

    ppo.train._prompt_batch = traced

    def share_of_target(prompts, texts, rollout):
        hits = ((rollout.response_ids == target).float() * rollout.response_mask).sum(dim=1)
        return hits / rollout.response_mask.sum(dim=1).clamp(min=1)

    ppo.train.train(load_config(PPOConfig, None, overrides), ArtifactStore(ws), share_of_target)
    return 0


if __name__ == "__main__":
    TRACE = Path(sys.argv[1])
    TRACE.mkdir(parents=True, exist_ok=True)
    if sys.argv[2] == "ppo-toy":
        sys.exit(ppo_toy(sys.argv[3], int(sys.argv[4]), sys.argv[5:]))
    trace_trainer_batches()
    from rlhf import cli

    sys.exit(cli.main(sys.argv[3:]))
