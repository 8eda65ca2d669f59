"""One benchmark stage, one side (the suite or its plain-library baseline), in its own process.

    python -m bench.stages STAGE SIDE WORKSPACE BUDGET_JSON RESULT_JSON      (run by `python -m bench`)

A process per side, so peak RSS and wall time are that side's own. Both sides get the same
work: the same model, rows, sequence length, optimiser steps, batch size, learning rate and
seed. The baseline is what a user gets by calling the library directly with its defaults for
everything else: TRL's trainers (bf16 autocast over fp32 weights, gradient checkpointing on),
and for PPO, which TRL no longer has, the same loop run the plain way (one `generate` call
per prompt through the adapter; every position projected to the vocabulary in the update).

Every result has `tokens_per_s` (real tokens, not padding), `peak_mem_mb`, `wall_s`,
`metric` (named by `metric_name`) and `flops`, the model FLOPs of the timed work:
  forward 2·N per token; LoRA backward 2·N (activation gradients through the frozen
  weights; the adapter's own weight gradients are negligible), so LoRA training is 4·N per
  token, and full training the usual 6·N. N counts the parameters that take part in a
  matmul (`matmul_params`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rlhf.artifacts import ArtifactStore
from rlhf.training import peak_memory_mb

# TRL's own LoRA defaults (`trl.ModelConfig`): its scripts train with a 0.05 adapter dropout.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def _lora(task_type: str, **override):
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, **{**LORA, **override})


def _trl_args(config_cls, budget: dict, out: Path, **extra):
    """TRL's own defaults for everything but the shared budget and the CPU flag."""
    import torch

    return config_cls(output_dir=str(out), max_steps=budget["steps"], per_device_train_batch_size=budget["batch_size"],
                      per_device_eval_batch_size=budget["batch_size"], learning_rate=budget["learning_rate"],
                      max_length=budget["max_length"], seed=budget["seed"], data_seed=budget["seed"], report_to=[],
                      save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **extra)


def _timed_train(trainer) -> tuple[float, int]:
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, trainer._total_train_tokens


def _suite_overrides(budget: dict, data: str, output: str) -> list[str]:
    return ["model=base:latest", f"data={data}", f"output={output}", f"train.max_steps={budget['steps']}",
            f"train.batch_size={budget['batch_size']}", f"train.learning_rate={budget['learning_rate']}",
            f"max_length={budget['max_length']}", f"train.seed={budget['seed']}",
            f"train.eval_fraction={budget['eval_fraction']}", "train.save_steps=100000",
            "report.to=none",  # the baseline has report_to=[] too
            *budget.get("suite", [])]


def matmul_params(model) -> int:
    """N for the FLOP formulas: the parameters that take part in a matmul.

    The input embedding is a lookup, not a matmul; an output projection (tied to it or not)
    is one, so a causal LM counts its vocabulary matrix once and a reward model not at all.
    """
    total = sum(p.numel() for p in model.parameters())
    out = model.get_output_embeddings()
    return total - model.get_input_embeddings().weight.numel() + (out.weight.numel() if out is not None else 0)


# -- SFT ---------------------------------------------------------------------------------------

def sft(side: str, store: ArtifactStore, budget: dict) -> dict[str, Any]:
    from rlhf import models

    base = store.resolve("base:latest")
    n = matmul_params(models.load_causal_lm(store, base))
    if side == "suite":
        from rlhf.config import SFTConfig, load_config
        from sft.train import main

        m = main(load_config(SFTConfig, None, _suite_overrides(budget, "sft:latest", "bench-sft")), store
                 ).manifest["metrics"]
        tokens, wall, metric = m["train_tokens"], m["wall_s"], m["eval_loss"]
    else:
        import trl
        from datasets import Dataset

        from rlhf.data import load_rows

        # The suite's held-out split (a seeded `train_test_split` of the one dataset).
        rows = load_rows(store.resolve("sft:latest"), schema="sft")
        split = Dataset.from_list(rows).train_test_split(test_size=budget["eval_fraction"], seed=budget["seed"])
        out = Path(tempfile.mkdtemp(prefix="bench-sft-"))
        trainer = trl.SFTTrainer(model=models.load_causal_lm(store, base), args=_trl_args(trl.SFTConfig, budget, out),
                                 train_dataset=split["train"], eval_dataset=split["test"],
                                 processing_class=models.load_tokenizer(base), peft_config=_lora("CAUSAL_LM"))
        wall, tokens = _timed_train(trainer)
        metric = trainer.evaluate()["eval_loss"]
        shutil.rmtree(out, ignore_errors=True)
    return {"tokens": tokens, "wall_s": wall, "metric": metric, "metric_name": "eval_loss", "flops": 4 * n * tokens}


# -- reward ------------------------------------------------------------------------------------

def reward(side: str, store: ArtifactStore, budget: dict) -> dict[str, Any]:
    from rlhf import models
    from rlhf.data import load_rows
    from rlhf.judges import raw_rewards

    base = store.resolve("base:latest")
    tokenizer = models.load_tokenizer(base)
    if side == "suite":
        from transformers import AutoModelForSequenceClassification

        from reward.train import main
        from rlhf.config import RewardConfig, load_config

        # truncation=drop: the rows TRL keeps (the suite's default cuts over-long pairs and trains on them).
        art = main(load_config(RewardConfig, None, [*_suite_overrides(budget, "prefs:latest", "bench-reward"),
                                                    "normalization_samples=16", "bootstrap_samples=100",
                                                    "truncation=drop"]), store)
        m = art.manifest["metrics"]
        tokens, wall = m["train_tokens"], m["wall_s"]
        # The stage's peak, before the dev check loads the published model again (about 0.6 GB here).
        peak = peak_memory_mb()
        model = AutoModelForSequenceClassification.from_pretrained(art.path)
    else:
        import trl

        trainer = _preference_trainer(trl.RewardTrainer, trl.RewardConfig, store, budget, "SEQ_CLS",
                                      models.load_sequence_classifier(store, base, pad_token_id=tokenizer.pad_token_id))
        wall, tokens = _timed_train(trainer)
        peak = peak_memory_mb()
        model = trainer.model.merge_and_unload()  # in place: the dev check scores the model it trained
    dev = load_rows(store.resolve("prefs-dev:latest"))[:budget["dev_limit"]]
    chosen = raw_rewards(model, tokenizer, [r["prompt"] + r["chosen"] for r in dev], 16, budget["max_length"])
    rejected = raw_rewards(model, tokenizer, [r["prompt"] + r["rejected"] for r in dev], 16, budget["max_length"])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(dev)
    return {"tokens": tokens, "wall_s": wall, "metric": accuracy, "metric_name": f"dev accuracy ({len(dev)} pairs)",
            "flops": 4 * matmul_params(model) * tokens, "peak_mem_mb": peak}


def _preference_trainer(trainer_cls, config_cls, store: ArtifactStore, budget: dict, task_type: str, model):
    """A plain TRL trainer on the suite's own training split of `prefs:latest`."""
    from rlhf import models
    from rlhf.data import load_rows, split_pairs

    prefs = store.resolve("prefs:latest")
    split = split_pairs(prefs, load_rows(prefs), budget["eval_fraction"], budget["seed"],
                        ["prompt", "chosen", "rejected"], stage="the benchmark")
    out = Path(tempfile.mkdtemp(prefix="trl-", dir=store.root))  # removed with the bench's workspace
    return trainer_cls(model=model, args=_trl_args(config_cls, budget, out), train_dataset=split["train"],
                       eval_dataset=split["test"], processing_class=models.load_tokenizer(store.resolve("base:latest")),
                       peft_config=_lora(task_type))


# -- DPO ---------------------------------------------------------------------------------------

def dpo(side: str, store: ArtifactStore, budget: dict) -> dict[str, Any]:
    from rlhf import models

    base = store.resolve("base:latest")
    n = matmul_params(models.load_causal_lm(store, base))
    if side == "suite":
        from dpo.train import main
        from rlhf.config import DPOConfig, load_config

        m = main(load_config(DPOConfig, None, [*_suite_overrides(budget, "prefs:latest", "bench-dpo"),
                                               "kl_prompts=0"]), store).manifest["metrics"]
        tokens, wall, metric = m["train_tokens"], m["wall_s"], m["eval_loss"]
    else:
        import trl

        trainer = _preference_trainer(trl.DPOTrainer, trl.DPOConfig, store, budget, "CAUSAL_LM",
                                      models.load_causal_lm(store, base))
        wall, tokens = _timed_train(trainer)
        metric = trainer.evaluate()["eval_loss"]
    # The policy trains (4·N per token) and the reference, the same weights with the adapter
    # off, runs forward (2·N per token).
    return {"tokens": tokens, "wall_s": wall, "metric": metric, "metric_name": "eval_loss", "flops": 6 * n * tokens}


# -- PPO ---------------------------------------------------------------------------------------

def _ppo_setup(store: ArtifactStore, budget: dict, with_sampler: bool):
    """The PPO actor (base + a fresh LoRA adapter), optionally its sampler, and encoded prompts.

    The actor keeps fp32 weights under autocast to the machine's auto precision (fp32 where the
    hardware has no native bf16), as `rlhf ppo` does; the sampler is its merged copy in that dtype.
    """
    from peft import get_peft_model

    from ppo.rollout import merged_sampler
    from rlhf.sampling import encode_prompts
    from rlhf import models
    from rlhf.data import load_rows

    base_art = store.resolve("base:latest")
    tokenizer = models.load_tokenizer(base_art)
    base = models.load_causal_lm(store, base_art)
    n = matmul_params(base)
    # In the dtype `rlhf ppo` samples in: the one the machine's auto precision names.
    sampler = merged_sampler(base, models.torch_dtype(models.resolve_precision("auto"))) if with_sampler else None
    policy = get_peft_model(base, _lora("CAUSAL_LM", lora_dropout=0.0))  # as `rlhf ppo`: no adapter dropout
    prompts = [r["prompt"] for r in load_rows(store.resolve("prompts:latest"), schema="prompts")]
    prompts = prompts[:budget["rollout_prompts"]]
    ids, mask, _ = encode_prompts(tokenizer, prompts, max_prompt_length=budget["max_length"])
    return tokenizer, policy, sampler, ids, mask, n


def ppo_rollout(side: str, store: ArtifactStore, budget: dict) -> dict[str, Any]:
    """Generation tokens/s: the suite's batched, merged sampler against per-prompt `generate`."""
    import torch

    from ppo.rollout import sync_sampler
    from rlhf.sampling import response_mask, sample

    from rlhf import models

    tokenizer, policy, sampler, ids, mask, n = _ppo_setup(store, budget, with_sampler=side == "suite")
    dtype = models.torch_dtype(models.resolve_precision("auto"))
    torch.manual_seed(budget["seed"])
    start = time.perf_counter()
    with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=dtype,
                        enabled=dtype != torch.float32):
        if side == "suite":
            sync_sampler(sampler, policy)
            masks = [sample(sampler, tokenizer, ids, mask, budget["max_new_tokens"], 0.7).response_mask]
        else:  # transformers' own sampling, one prompt at a time through the adapter
            masks = []
            for i in range(len(ids)):
                prompt = ids[i:i + 1, ids.shape[1] - int(mask[i].sum()):]
                out = policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=budget["max_new_tokens"], do_sample=True, temperature=0.7,
                                      top_k=0, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
                masks.append(response_mask(out[:, prompt.shape[1]:], tokenizer.eos_token_id)[0])
    wall = time.perf_counter() - start
    tokens = sum(int(m.sum()) for m in masks)
    return {"tokens": tokens, "wall_s": wall, "metric": tokens / len(ids), "metric_name": "mean response tokens",
            "flops": 2 * n * tokens}


def ppo_update(side: str, store: ArtifactStore, budget: dict) -> dict[str, Any]:
    """PPO's optimisation phase on one fixed rollout batch: `ppo.update_epochs` passes of minibatches.

    Both sides sample the same batch through the policy. The suite projects only the response
    positions to the vocabulary (`logits_to_keep`), runs the rollout padding-free, each LoRA layer
    as one function and the LM head from a kept bf16 copy (`training.fused_lora_on_cpu`), and takes
    log-probs by `sampling.TokenLogprobs`, as `rlhf ppo` does at its defaults; the baseline, like a
    plain `model(...).logits`, projects every position, the prompt's included, of the padded batch,
    and takes log-probs by autograd through log-softmax.
    """
    import torch
    from accelerate import Accelerator
    from torch import nn

    from ppo import core
    from ppo import train as ppo_train
    from rlhf import models, sampling, training
    from rlhf.config import PPOConfig, load_config
    from rlhf.sampling import forward_response, sample

    tokenizer, policy, _, ids, mask, n = _ppo_setup(store, budget, with_sampler=False)
    cfg = load_config(PPOConfig, None, [f"train.batch_size={len(ids)}", f"ppo.minibatch_size={budget['batch_size']}",
                                        f"train.learning_rate={budget['learning_rate']}",
                                        *(budget.get("suite", []) if side == "suite" else [])])
    precision = models.resolve_precision("auto")  # as `rlhf ppo` at its default precision=auto
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              cpu=not torch.cuda.is_available())
    torch.manual_seed(budget["seed"])
    with accelerator.autocast():
        rollout = sample(policy, tokenizer, ids, mask, budget["max_new_tokens"], 0.7)
    if side == "baseline":
        forward = policy.forward

        def plain_forward(*args, logits_to_keep, **kwargs):
            out = forward(*args, **kwargs)  # every position projected to the vocabulary
            out.logits = out.logits[:, logits_to_keep]
            return out

        policy.forward = plain_forward
        # Log-probs by plain autograd: log-softmax of the fp32 logits over the temperature, gathered.
        sampling.token_logprobs = lambda logits, labels, t: sampling.logprobs_from_logits(logits.float() / t, labels)
    # A fixed synthetic score (response length), so both sides optimise the same objective.
    score = rollout.response_mask.sum(dim=1) / budget["max_new_tokens"]
    model = ppo_train.ActorCritic(policy, nn.Linear(policy.config.hidden_size, 1), 0.7)
    with training.packed_where_safe(policy, side == "suite" and cfg.padding_free), \
            training.fused_lora_on_cpu(policy) if side == "suite" else nullcontext():
        with torch.no_grad(), accelerator.autocast():
            out = model(rollout)
            with policy.disable_adapter():
                ref = forward_response(policy, rollout, 0.7)["logprobs"]
        rewards, _ = core.kl_penalized_rewards(score, out["logprobs"], ref, rollout.response_mask, 0.05)
        values = out["values"] * rollout.response_mask
        advantages, returns = core.gae(rewards, values, rollout.response_mask, 1.0, 0.95)
        advantages = core.masked_whiten(advantages, rollout.response_mask)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=budget["learning_rate"])
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        start = time.perf_counter()
        stats = ppo_train.ppo_update(model, optimizer, accelerator, rollout, out["logprobs"], values, advantages,
                                     returns, cfg)
        wall = time.perf_counter() - start
    tokens = cfg.ppo.update_epochs * int(rollout.attention_mask.sum())
    return {"tokens": tokens, "wall_s": wall, "metric": stats["policy_loss"], "metric_name": "mean policy loss",
            "flops": 4 * n * tokens}


STAGES = {"sft": sft, "reward": reward, "dpo": dpo, "ppo_rollout": ppo_rollout, "ppo_update": ppo_update}


def main(argv: list[str]) -> None:
    stage, side, workspace, budget, result = argv
    r = STAGES[stage](side, ArtifactStore(Path(workspace)), json.loads(budget))
    r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    r.setdefault("peak_mem_mb", peak_memory_mb())  # a stage may take its peak before work that is not its own
    Path(result).write_text(json.dumps(r))


if __name__ == "__main__":
    main(sys.argv[1:])
