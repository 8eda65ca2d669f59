"""`rlhf dpo`: direct preference optimisation with TRL's DPOTrainer.

    rlhf dpo                                         # sft:latest + preferences:latest -> checkpoints/dpo/vK
    rlhf dpo --config configs/dpo.yaml beta=0.2 loss_type=ipo
    rlhf dpo precompute_ref_log_probs=true train.max_steps=100

The reference is the policy with its LoRA adapter disabled (TRL does this when given a PEFT
model and no reference), so no second copy is loaded. Held out: reward accuracy and margin
of the implicit reward β·log(π/π_ref), and the KL to the reference on sampled responses.
"""

from __future__ import annotations

import shutil

import torch

from rlhf import data as rdata
from rlhf import finetune, models, progress, training
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import DPOConfig, dump
from rlhf.errors import RlhfError
from rlhf.sampling import encode_prompts, forward_response, sample


def check(cfg: DPOConfig, store: ArtifactStore) -> training.Inputs:
    """Everything that can fail before any work is done (also run on every trial of a sweep first)."""
    import trl

    loss_type = [cfg.loss_type] if isinstance(cfg.loss_type, str) else cfg.loss_type
    known = trl_loss_types()
    if known and (unknown := [t for t in loss_type if t not in known]):
        raise RlhfError(f"config: loss_type {unknown[0]!r} is not a TRL DPO loss; choose from {', '.join(sorted(known))}")
    return training.prepare_inputs(cfg, store, trl.DPOConfig, schema="preferences", task_type="CAUSAL_LM")


def main(cfg: DPOConfig, store: ArtifactStore) -> Artifact | None:
    import trl

    # 1. Check everything that can fail before any work is done.
    inputs = check(cfg, store)
    init = inputs.model
    loss_type = [cfg.loss_type] if isinstance(cfg.loss_type, str) else cfg.loss_type

    # 2. Held-out split per dataset, the same for the same seed; the training parts mixed.
    split, data_mix = training.split_and_mix(inputs, cfg, lambda dataset, rows: rdata.split_pairs(
        dataset, rows, cfg.train.eval_fraction, cfg.train.seed, ["prompt", "chosen", "rejected"], stage="DPO"))

    # 3. Policy = input weights + the training mode (an adapter, or frozen layers); reference = the
    #    policy with its adapter off. (full and freeze have no adapter to switch off, so TRL keeps a
    #    frozen copy as the reference.)
    tokenizer = models.load_tokenizer(init)
    # TRL cuts each side at max_length and runs chosen and rejected in one batch.
    longest = max(max(training.chat_lengths(tokenizer, [r["prompt"] + r[side] for r in split["train"]]))
                  for side in ("chosen", "rejected"))
    checkpointing, why = training.checkpointing_decision(
        cfg.train.gradient_checkpointing, models.model_config(store, init), 2 * cfg.train.batch_size,
        min(longest, cfg.max_length))
    model = models.load_causal_lm(store, init, mode=cfg.mode)
    peft_config, mode_facts = finetune.prepare(cfg, model, task_type="CAUSAL_LM")

    # 4. Train, resuming an identical killed run.
    config = dump(cfg)
    scratch = store.scratch_dir("dpo", training.run_id(config, [init, *inputs.datasets]))
    args = trl.DPOConfig(**training.trainer_kwargs(cfg.train, scratch, inputs.precision, has_eval=True,
                                                   gradient_checkpointing=checkpointing, report_to=cfg.report.to),
                         max_length=cfg.max_length, beta=cfg.beta, loss_type=loss_type,
                         precompute_ref_log_probs=cfg.precompute_ref_log_probs, **cfg.trl)
    trainer = training.length_grouped(trl.DPOTrainer)(
        model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"], processing_class=tokenizer,
        peft_config=peft_config, callbacks=training.callbacks(cfg.train))
    done = training.fit(trainer, scratch, cfg.train, cfg.padding_free)
    if done is None:  # only the main process publishes
        return None
    initial, final = done.initial, done.final

    # 5. KL to the reference on held-out prompts, from responses the trained policy samples.
    prompts = [r["prompt"] for r in split["test"]][:cfg.kl_prompts]
    kl = None
    if prompts:
        with progress.phase(f"dpo: KL to the reference on {len(prompts)} held-out prompts"):
            kl = held_out_kl(trainer.model, trainer.ref_model, tokenizer, prompts, cfg.max_new_tokens)
    run_metrics = training.run_metrics(trainer, done.run, inputs.precision)
    with store.create("checkpoint", cfg.output, stage="dpo", config=config) as w:
        trainer.model.save_pretrained(w.path)
        models.make_portable(w.path, init)
        tokenizer.save_pretrained(w.path)
        training.save_logs(trainer, scratch, w.path / training.LOGS_DIR)
        w.add_input("model", init, loaded_as=models.loaded_as(store, init))
        w.add_input("reference", init)
        for dataset in inputs.datasets:
            w.add_input("data", dataset)
        w.metrics.update({
            "eval_reward_accuracy_initial": initial.get("eval_rewards/accuracies"),
            "eval_reward_accuracy": final.get("eval_rewards/accuracies"),
            "eval_reward_margin_initial": initial.get("eval_rewards/margins"),
            "eval_reward_margin": final.get("eval_rewards/margins"),
            "eval_loss_initial": initial["eval_loss"],
            "eval_loss": final["eval_loss"],
            "eval_kl_to_reference": kl,
            "train_pairs": len(split["train"]),
            "eval_pairs": len(split["test"]),
            **({"data_mix": data_mix} if len(data_mix) > 1 else {}),
            **mode_facts,
            "gradient_checkpointing": {"enabled": checkpointing, "reason": why},
            "padding_free": done.padding_free,
            **done.stop,
            **run_metrics,
        })
    shutil.rmtree(scratch, ignore_errors=True)
    return w.result


def trl_loss_types() -> set[str]:
    """The loss names TRL's DPOConfig documents for `loss_type` (TRL itself checks only mid-training)."""
    import dataclasses
    import re

    import trl

    field = next(f for f in dataclasses.fields(trl.DPOConfig) if f.name == "loss_type")
    return set(re.findall(r"`'([a-z0-9_]+)'`", field.metadata.get("help", "")))


@torch.no_grad()
def held_out_kl(model, ref_model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 8) -> float:
    """Mean over prompts of Σ_t [log π(y_t) − log π_ref(y_t)] for responses y ~ π (a KL estimate).

    `ref_model` None means the reference is `model` with its adapter disabled. The prompts are
    encoded on the CPU; `sample` and `forward_response` move them to each model's device.
    """
    model.eval()
    per_seq = []
    for i in range(0, len(prompts), batch_size):
        ids, mask, _ = encode_prompts(tokenizer, prompts[i:i + batch_size], max_prompt_length=1024)
        rollout = sample(model, tokenizer, ids, mask, max_new_tokens, temperature=1.0)
        logprobs = forward_response(model, rollout)["logprobs"]
        if ref_model is None:
            with model.disable_adapter():
                ref_logprobs = forward_response(model, rollout)["logprobs"]
        else:
            ref_logprobs = forward_response(ref_model, rollout)["logprobs"]
        per_seq.append(((logprobs - ref_logprobs) * rollout.response_mask).sum(dim=1))
    return float(torch.cat(per_seq).mean())
