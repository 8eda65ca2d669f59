"""Glue every TRL-based training stage shares: trainer arguments, resume, metrics, logs.

Kept out of the stages so that `sft`, `reward` and `dpo` resume, measure and log the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.artifacts import Artifact
from rlhf.config import TrainConfig

log = logging.getLogger(__name__)


def run_id(config: dict[str, Any], inputs: list[Artifact]) -> str:
    """Same config and same input contents -> same id, so re-running a killed command resumes it."""
    key = json.dumps({"config": config, "inputs": [a.content_hash for a in inputs]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def last_complete_checkpoint(scratch: Path) -> Path | None:
    """The newest `checkpoint-N` whose trainer state was written.

    transformers writes a checkpoint's files one by one and `trainer_state.json` last, so a
    run killed mid-save leaves a directory without it; that one is skipped (and removed).
    """
    best = None
    for d in sorted(scratch.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        try:
            json.loads((d / "trainer_state.json").read_text())
            best = d
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
    return best


def trainer_kwargs(train: TrainConfig, scratch: Path, precision: str, has_eval: bool) -> dict[str, Any]:
    """The `transformers.TrainingArguments` fields our `train:` section maps to."""
    import torch

    return {
        "output_dir": str(scratch),
        "max_steps": train.max_steps,
        "num_train_epochs": train.epochs,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "learning_rate": train.learning_rate,
        "seed": train.seed,
        "data_seed": train.seed,
        "bf16": precision == "bf16",  # autocast; on a CPU it needs use_cpu below
        "use_cpu": not torch.cuda.is_available(),
        # TRL turns this on by default; recompute costs ~30% step time and the models this
        # suite trains on one machine fit without it, so it is opt-in.
        "gradient_checkpointing": train.gradient_checkpointing,
        "eval_strategy": "steps" if (has_eval and train.eval_steps) else "no",
        "eval_steps": train.eval_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        # Two, so that a kill during a save still leaves the previous complete checkpoint.
        "save_total_limit": 2,
        "logging_steps": train.logging_steps,
        "report_to": [],
        "disable_tqdm": False,
    }


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated if on a GPU, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save_logs(log_history: list[dict[str, Any]], out_dir: Path) -> None:
    """The trainer's log history as JSONL plus a loss-curve PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "train_log.jsonl", "w") as f:
        for entry in log_history:
            f.write(json.dumps(entry) + "\n")
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


@dataclass
class TrainRun:
    """What a finished `trainer.train()` leaves for the manifest."""

    result: Any
    wall_s: float
    resumed_from: Path | None


def train_resumable(trainer, scratch: Path) -> TrainRun:
    """Train, continuing from the last complete checkpoint an identical killed run left in `scratch`."""
    resume = last_complete_checkpoint(scratch) if scratch.exists() else None
    if resume:
        log.warning("resuming from %s", resume)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return TrainRun(result, time.perf_counter() - start, resume)


def run_metrics(trainer, run: TrainRun, precision: str) -> dict[str, Any]:
    """Loss, throughput, memory and sizes every TRL-based stage records in its manifest."""
    from rlhf.models import count_parameters

    trainable, total = count_parameters(trainer.model)
    # Real (non-padding) tokens this run trained on, counted by TRL per batch across processes.
    tokens = trainer._total_train_tokens
    return {
        "train_loss": run.result.training_loss,
        "steps": trainer.state.global_step,
        "train_tokens": tokens,
        "tokens_per_s": tokens / run.wall_s,
        "wall_s": run.wall_s,
        "peak_mem_mb": peak_memory_mb(),
        "precision": precision,
        "trainable_params": trainable,
        "total_params": total,
        "processes": trainer.accelerator.num_processes,
        "resumed_from_step": int(run.resumed_from.name.split("-")[-1]) if run.resumed_from else None,
    }


def check_inputs(cfg, store, library_config: type, schema: str):
    """Everything a TRL stage can fail on before any work: pass-through keys, mode, precision,
    a writable workspace, the refs and the dataset's schema.

    Returns (precision, model artifact, data artifact, rows).
    """
    from rlhf import data, models
    from rlhf.config import check_passthrough

    check_passthrough("trl", cfg.trl, library_config)
    models.check_mode(cfg.mode)
    precision = models.resolve_precision(cfg.train.precision)
    store.check_writable()
    model = store.resolve(cfg.model, kind="checkpoint")
    dataset = store.resolve(cfg.data, kind="dataset")
    return precision, model, dataset, data.load_rows(dataset, schema=schema)
