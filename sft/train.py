"""`rlhf sft`: supervised fine-tuning with TRL's SFTTrainer.

    rlhf sft                                         # base:latest + sft:latest -> checkpoints/sft/vK
    rlhf sft --config configs/sft.yaml train.max_steps=20 lora.r=8
    rlhf sft mode=full train.learning_rate=2e-5
    rlhf sft mode=freeze freeze.trainable_layers=2           # top 2 blocks + head; the rest frozen
    rlhf sft mode=peft peft.method=ia3                        # any peft method, options as peft.KEY=VALUE
    rlhf sft data=[support:latest,chitchat:v2] data_weights=[0.7,0.3]
    rlhf sft model=sft:v1 data=support:latest                 # sequential: SFT from an SFT checkpoint
    rlhf sft train.eval_steps=10 train.early_stopping_patience=3
    accelerate launch --num_processes 2 --cpu -m rlhf.cli sft train.max_steps=10

Loss is on the completion only. A killed run resumes from its last trainer checkpoint in
`workspace/.scratch/sft-<run id>/` when the same command is run again.
"""

from __future__ import annotations

import logging
import shutil

from rlhf import finetune, models, training
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import SFTConfig, dump
from rlhf.errors import RlhfError

log = logging.getLogger(__name__)


def check(cfg: SFTConfig, store: ArtifactStore) -> training.Inputs:
    """Everything that can fail before any work is done (also run on every trial of a sweep first)."""
    import trl

    inputs = training.prepare_inputs(cfg, store, trl.SFTConfig, schema="sft", task_type="CAUSAL_LM")
    for dataset, rows in zip(inputs.datasets, inputs.rows):
        if len(rows) < 2:
            raise RlhfError(f"{dataset.ref} has {len(rows)} row(s); SFT needs at least 2 per dataset "
                            "(one to train, one to evaluate)")
    return inputs


def main(cfg: SFTConfig, store: ArtifactStore) -> Artifact | None:
    import trl
    from datasets import Dataset

    # 1. Check everything that can fail before any work is done.
    inputs = check(cfg, store)
    base = inputs.model

    # 2. Split off a held-out set per dataset, the same one on every run with this seed; mix the rest.
    split, data_mix = training.split_and_mix(inputs, cfg, lambda _, rows: Dataset.from_list(rows).train_test_split(
        test_size=cfg.train.eval_fraction, seed=cfg.train.seed))

    # 3. Lengths as TRL will tokenise them, before any model loads: what is cut, and whether
    #    anything is left to learn from; then whether the longest batch needs checkpointing.
    tokenizer = models.load_tokenizer(base)
    length_facts, longest = fit_lengths(tokenizer, split, cfg.max_length, inputs.datasets)
    checkpointing, why = training.checkpointing_decision(
        cfg.train.gradient_checkpointing, models.model_config(store, base), cfg.train.batch_size, longest)

    # 4. Model and the training mode: an adapter config, or frozen layers.
    model = models.load_causal_lm(store, base, mode=cfg.mode)
    peft_config, mode_facts = finetune.prepare(cfg, model, task_type="CAUSAL_LM")

    # 5. Train, resuming from the scratch checkpoints of an identical earlier run if any.
    config = dump(cfg)
    scratch = store.scratch_dir("sft", training.run_id(config, [base, *inputs.datasets]))
    args = trl.SFTConfig(
        **training.trainer_kwargs(cfg.train, scratch, inputs.precision, has_eval=True,
                                  gradient_checkpointing=checkpointing, report_to=cfg.report.to),
        max_length=cfg.max_length,
        completion_only_loss=True,
        **cfg.trl,
    )
    trainer = training.length_grouped(trl.SFTTrainer)(
        model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"], processing_class=tokenizer,
        peft_config=peft_config, callbacks=training.callbacks(cfg.train))
    done = training.fit(trainer, scratch, cfg.train, cfg.padding_free)

    # 6. Publish the artifact (main process only under `accelerate launch`).
    if done is None:
        return None
    metrics = training.run_metrics(trainer, done.run, inputs.precision)
    out_model = trainer.model
    if cfg.merge:
        out_model = out_model.merge_and_unload()
    with store.create("checkpoint", cfg.output, stage="sft", config=config) as w:
        out_model.save_pretrained(w.path)
        models.make_portable(w.path, base)
        tokenizer.save_pretrained(w.path)
        training.save_logs(trainer, scratch, w.path / training.LOGS_DIR)
        w.add_input("model", base, loaded_as=models.loaded_as(store, base))
        for dataset in inputs.datasets:
            w.add_input("data", dataset)
        w.metrics.update({
            "eval_loss_initial": done.initial["eval_loss"],
            "eval_loss": done.final["eval_loss"],
            "train_rows": len(split["train"]),
            "eval_rows": len(split["test"]),
            **({"data_mix": data_mix} if len(data_mix) > 1 else {}),
            **mode_facts,
            "merged": cfg.merge,
            **length_facts,
            "gradient_checkpointing": {"enabled": checkpointing, "reason": why},
            "padding_free": done.padding_free,
            **done.stop,
            **metrics,
        })
    shutil.rmtree(scratch, ignore_errors=True)
    return w.result


def fit_lengths(tokenizer, split, max_length: int, datasets: list[Artifact]) -> tuple[dict, int]:
    """Count the examples TRL will cut at `max_length`, and those left with no completion token
    (which TRL drops); refuse when a side has none left. Returns (facts, longest kept length)."""
    facts, longest = {}, 0
    for part, what in (("train", "training"), ("test", "held-out")):
        rows = split[part]
        full = training.chat_lengths(tokenizer, [r["prompt"] + r["completion"] for r in rows])
        prompt = training.chat_lengths(tokenizer, [r["prompt"] for r in rows], add_generation_prompt=True)
        cut = sum(n > max_length for n in full)
        dropped = sum(p >= max_length for p in prompt)
        if dropped == len(rows):
            raise RlhfError(f"all {len(rows)} {what} examples of {', '.join(d.ref for d in datasets)} have prompts of "
                            f"max_length={max_length} tokens or more, which leaves no reply to learn from; raise "
                            f"max_length (the longest example has {max(full)} tokens)")
        if cut:
            log.warning("%d of %d %s examples are longer than max_length=%d tokens and are cut (the longest has %d); "
                        "raise max_length, or drop them at import: rlhf data import sft FILE --max-tokens %d",
                        cut, len(rows), what, max_length, max(full), max_length)
        key = "train" if part == "train" else "eval"
        facts.update({f"{key}_rows_truncated": cut, f"{key}_rows_dropped_too_long": dropped})
        longest = max(longest, min(max(full), max_length))
    return facts, longest
