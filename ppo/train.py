"""`rlhf ppo`: PPO against a reward model, after InstructGPT and "The N+ Implementation Details
of RLHF with PPO" (Huang et al. 2024). The math is in `ppo/core.py`; this loop only orchestrates.

    rlhf ppo                                    # sft:latest + reward:latest + prompts:latest -> checkpoints/ppo/vK
    rlhf ppo --config configs/ppo.yaml ppo.kl_coef=0.1 train.max_steps=40
    accelerate launch --multi_gpu --num_processes 2 -m rlhf.cli ppo ...

Models: the actor is the input checkpoint plus a LoRA adapter; the reference is the same
weights with the adapter disabled (no second copy); the critic is a value head on the actor,
starting at zero (or, with `ppo.value_init=reward`, as the reward model's score head); the
reward is the normalised reward-model score. A killed run resumes from
`workspace/.scratch/ppo-<run id>/` when re-run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ppo import core
from ppo.rollout import merged_sampler, sync_sampler
from rlhf import data as rdata
from rlhf import faults, models, progress, training
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import PPOConfig, dump
from rlhf.errors import RlhfError
from rlhf.judges import gold_score
from rlhf.sampling import Rollout, decode_responses, encode_prompts, forward_response, sample

log = logging.getLogger(__name__)

# Under FSDP or DeepSpeed each process holds a shard of the weights, so there is no whole
# model to merge into a sampler; those runs sample through the adapter.
_SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")

# (prompts, response texts, rollout) -> scores (B,). The CLI scores with a reward model;
# tests pass a toy function of the token ids.
RewardFn = Callable[[list, list[str], Rollout], torch.Tensor]


class ActorCritic(nn.Module):
    """The LoRA policy and a scalar value head on its last hidden state, trained together."""

    def __init__(self, policy, value_head: nn.Linear, temperature: float):
        super().__init__()
        self.policy, self.value_head, self.temperature = policy, value_head, temperature

    def forward(self, rollout: Rollout, with_logits: bool = False) -> dict[str, torch.Tensor]:
        """Log-probs of the response tokens, and the value of each, read from the hidden state that
        predicts the token; with `with_logits`, their logits too (the update has no use for them,
        and accelerate would cast them to fp32 on the way out of a mixed-precision model)."""
        out = forward_response(self.policy, rollout, self.temperature, with_hidden=True)
        out["values"] = self.value_head(out.pop("hidden").to(self.value_head.weight.dtype)).squeeze(-1).float()
        if not with_logits:
            del out["logits"]
        return out


@dataclass
class Inputs:
    """PPO's checked inputs: the precision, the policy to start from, and the prompts split."""

    precision: str
    policy_init: Artifact
    prompts: Artifact
    train_prompts: list
    eval_prompts: list
    eval_data: Artifact | None = None  # the held-out prompts' dataset, with eval_data=


def check(cfg: PPOConfig, store: ArtifactStore, with_reward: bool = True) -> Inputs:
    """Everything that can fail before any work is done (also run on every trial of a sweep first).

    `with_reward=False` is for `train` with a score function of its own (the tests' toy rewards).
    """
    from rlhf.judges import check_reward_checkpoint

    precision = models.resolve_precision(cfg.train.precision)
    models.check_launch()
    models.check_mode(cfg.mode)
    training.check_trackers(cfg.report.to)
    store.check_writable()
    policy_init = models.check_policy(store.resolve(cfg.model, kind="checkpoint"))
    models.load_tokenizer(policy_init)  # has a chat template
    if with_reward:
        check_reward_checkpoint(store.resolve(cfg.reward, kind="checkpoint"))
        if cfg.ppo.value_init == "reward":
            check_value_init(store, cfg, policy_init)
    prompts_art = store.resolve(cfg.data, kind="dataset")
    train_rows, held_rows, held_out = rdata.prompt_sets(store, prompts_art, cfg.eval_data, cfg.train.eval_fraction,
                                                        cfg.train.seed, stage="PPO")
    train_prompts, eval_prompts = [r["prompt"] for r in train_rows], [r["prompt"] for r in held_rows]
    return Inputs(precision, policy_init, prompts_art, train_prompts, eval_prompts, held_out)


def check_value_init(store: ArtifactStore, cfg: PPOConfig, policy_init: Artifact) -> None:
    """ppo.value_init=reward copies the reward model's score head onto the policy's last hidden
    state: the two must have the same hidden size (read from their configs, no weights loaded)."""
    theirs = models.model_config(store, store.resolve(cfg.reward, kind="checkpoint")).hidden_size
    ours = models.model_config(store, policy_init).hidden_size
    if theirs != ours:
        raise RlhfError(f"ppo.value_init=reward copies {cfg.reward}'s score head (hidden size {theirs}) onto the "
                        f"policy {policy_init.ref} (hidden size {ours}), which cannot fit; pass ppo.value_init=zero, "
                        "or a reward model trained from this policy's family")


def main(cfg: PPOConfig, store: ArtifactStore) -> Artifact | None:
    from rlhf.judges import RewardModel

    # 0. Check everything that can fail before any model loads.
    inputs = check(cfg, store)
    reward = RewardModel(store, cfg.reward)

    def score_fn(prompts, texts, rollout):
        return torch.tensor(reward.score(prompts, texts, batch_size=cfg.train.batch_size,
                                         padding_free=cfg.padding_free))

    head = value_head_init(reward) if cfg.ppo.value_init == "reward" else None
    return train(cfg, store, score_fn, reward_artifact=reward.artifact, reward_head=head, inputs=inputs)


def value_head_init(reward) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights that make the value head start as the reward model's normalised score head."""
    head = getattr(reward.model, "score", None)
    if not isinstance(head, nn.Linear):
        raise RlhfError(f"ppo.value_init=reward needs a linear `score` head, and {reward.artifact.ref} "
                        f"({type(reward.model).__name__}) has none; pass ppo.value_init=zero")
    w = head.weight.detach().float()  # (1, hidden)
    return w / reward.std, torch.tensor([-reward.mean / reward.std])


@dataclass
class Run:
    """What `setup` builds, `fit` trains and `publish` saves."""

    cfg: PPOConfig
    inputs: Inputs
    config: dict
    scratch: Path
    accelerator: Any
    tokenizer: Any
    model: nn.Module  # the ActorCritic as accelerate prepared it (DDP-wrapped under several processes)
    unwrapped: ActorCritic
    optimizer: torch.optim.Optimizer
    sampler: nn.Module | None
    kl_ctl: Any
    n_iters: int
    start_iter: int
    padding_free: dict = field(default_factory=dict)  # training.padding_free_decision, for the manifest
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=lambda: {"generation_s": 0.0, "generation_tokens": 0, "update_s": 0.0,
                                                   "update_tokens": 0, "prompts_truncated": 0, "wall_s": 0.0})

    @property
    def global_batch(self) -> int:
        """Prompts per iteration over all processes, each taking train.batch_size of them."""
        return self.cfg.train.batch_size * self.accelerator.num_processes


def train(cfg: PPOConfig, store: ArtifactStore, score_fn: RewardFn, reward_artifact: Artifact | None = None,
          reward_head: tuple[torch.Tensor, torch.Tensor] | None = None, inputs: Inputs | None = None) -> Artifact | None:
    """Set up, run the PPO iterations (resuming a killed run) and publish; None on all but the main process.

    `reward_head` starts the value head when `ppo.value_init=reward` (`value_head_init`); a caller
    with a score function of its own (the tests' toy rewards) passes ppo.value_init=zero.
    """
    if cfg.ppo.value_init == "reward" and reward_head is None:
        raise RlhfError("ppo.value_init=reward needs the reward model's score head to start the value head; "
                        "pass ppo.value_init=zero with a score function of your own")
    inputs = inputs or check(cfg, store, with_reward=False)
    run = setup(cfg, store, inputs, [reward_artifact] if reward_artifact else [], reward_head)
    # Steps 4 and 7 and the evaluation's KL read whole rollouts; sampling (with its KV cache) runs as it comes.
    with training.packed_where_safe(run.unwrapped.policy, cfg.padding_free) as run.padding_free, \
            training.fused_lora_on_cpu(run.unwrapped.policy):
        fit(run, score_fn)
    return publish(run, store, reward_artifact)


def setup(cfg: PPOConfig, store: ArtifactStore, inputs: Inputs, extra_inputs: list[Artifact],
          reward_head: tuple[torch.Tensor, torch.Tensor] | None) -> Run:
    """The actor-critic, its optimizer, the sampler and the KL controller, restored from a killed run's state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft import LoraConfig, get_peft_model

    hp = cfg.ppo
    config = dump(cfg)
    scratch = store.scratch_dir("ppo", training.run_id(config, [inputs.policy_init, inputs.prompts, *extra_inputs]))
    # The same scalars as logs/ppo_log.jsonl, to the trackers of report.to, through accelerate.
    tracking = training.tracking_dir(scratch, cfg.report.to) if cfg.report.to else None
    # accelerate keeps one mixed precision per process and refuses another; a second run in the same
    # process (a notebook, the tests) may ask for a different one. TRL's trainers reset the same state
    # as they start (transformers' TrainingArguments); the process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision="no" if inputs.precision == "fp32" else inputs.precision,
                              cpu=not torch.cuda.is_available(), log_with=cfg.report.to or None, project_dir=tracking)
    if cfg.report.to:
        accelerator.init_trackers("ppo", config=training.flat_config(config))
    torch.manual_seed(cfg.train.seed + accelerator.process_index)
    tokenizer = models.load_tokenizer(inputs.policy_init)
    base = models.load_causal_lm(store, inputs.policy_init, mode=cfg.mode)
    if cfg.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    sampler = None
    if hp.merged_sampler and cfg.mode == "lora" and accelerator.distributed_type not in _SHARDED:
        sampler = merged_sampler(base, models.torch_dtype(inputs.precision)).to(accelerator.device)
    # No dropout: a rollout's log-probs must be the same in every pass that reads them.
    policy = get_peft_model(base, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                             target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    value_head = nn.Linear(base.config.hidden_size, 1)
    with torch.no_grad():
        value_head.weight.zero_(), value_head.bias.zero_()
        if hp.value_init == "reward":  # the shapes were checked against the configs (check_value_init)
            value_head.weight.copy_(reward_head[0]), value_head.bias.copy_(reward_head[1])
    model = ActorCritic(policy, value_head, hp.temperature)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.learning_rate,
                                  eps=1e-5)  # eps as in the N+ details
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (core.AdaptiveKLController(hp.kl_coef, hp.kl_target, hp.kl_horizon) if hp.adaptive_kl
              else core.FixedKLController(hp.kl_coef))
    run = Run(cfg, inputs, config, scratch, accelerator, tokenizer, model, accelerator.unwrap_model(model), optimizer,
              sampler, kl_ctl, n_iters=cfg.train.max_steps, start_iter=0)
    if cfg.train.max_steps < 0:  # -1: train.epochs passes over the prompts
        run.n_iters = math.ceil(cfg.train.epochs * len(inputs.train_prompts) / run.global_batch)
    run.start_iter = _resume(run)
    faults.point("load")
    return run


def fit(run: Run, score_fn: RewardFn) -> None:
    """The PPO iterations, steps 1-8 each, from `run.start_iter` to `run.n_iters`."""
    cfg, hp, accelerator = run.cfg, run.cfg.ppo, run.accelerator
    model, unwrapped, tokenizer, totals = run.model, run.unwrapped, run.tokenizer, run.totals
    device = accelerator.device
    run_start, wall_before = time.perf_counter(), totals["wall_s"]  # a resumed run adds to the killed run's time

    def generator() -> nn.Module:
        """The model to sample from now: the merged sampler, refreshed, or the policy itself."""
        if run.sampler is None:
            return unwrapped.policy
        sync_sampler(run.sampler, unwrapped.policy)
        return run.sampler

    def evaluate(iteration: int) -> dict:
        return _evaluate(unwrapped, generator(), tokenizer, run.inputs.eval_prompts, score_fn, cfg, iteration,
                         accelerator)

    if not run.start_iter:
        with progress.phase(f"ppo: scoring the starting policy on "
                            f"{min(cfg.eval_prompts, len(run.inputs.eval_prompts))} held-out prompts"):
            run.evals.append(evaluate(0))
    for it in range(run.start_iter, run.n_iters):
        training.take_offered_threads()  # `rlhf demo` frees a core once this job runs alone
        # 1. Sample a batch of prompts (a seeded shuffle per epoch; each process takes its own slice).
        batch = _prompt_batch(run.inputs.train_prompts, it, run.global_batch, cfg.train.batch_size,
                              accelerator.process_index, cfg.train.seed)
        prompt_ids, prompt_mask, n_cut = encode_prompts(tokenizer, batch, hp.max_prompt_length)
        totals["prompts_truncated"] += n_cut

        # 2. Generate with the KV cache, the whole batch at once.
        model.eval()
        t0 = time.perf_counter()
        with accelerator.autocast():
            rollout = sample(generator(), tokenizer, prompt_ids, prompt_mask, hp.max_new_tokens, hp.temperature,
                             cache=hp.rollout_cache)
        rollout = rollout.to(device)  # a no-op unless the sampler sits on another device than the policy
        totals["generation_s"] += time.perf_counter() - t0
        totals["generation_tokens"] += int(rollout.response_mask.sum())
        mask = rollout.response_mask

        # 3. Score; a response that hit the length limit without EOS is penalised.
        texts = decode_responses(tokenizer, rollout)
        raw_score = score_fn(batch, texts, rollout).to(device).float()
        score = raw_score - hp.missing_eos_penalty * (~rollout.has_eos).float()

        # 4. Log-probs of the sampled tokens under the policy and the reference (adapter off), and values.
        with torch.no_grad(), accelerator.autocast():
            out = unwrapped(rollout, with_logits=True)
            with unwrapped.policy.disable_adapter():
                ref_logprobs = forward_response(unwrapped.policy, rollout, hp.temperature)["logprobs"]
        old_logprobs, old_values = out["logprobs"], out["values"] * mask
        entropy = core.entropy_from_logits(out.pop("logits").float() / hp.temperature, mask)

        # 5. Per-token KL penalty, score added at the last real token.
        rewards, kl = core.kl_penalized_rewards(score, old_logprobs, ref_logprobs, mask, run.kl_ctl.value)

        # 6. GAE, then whiten the advantages over the batch.
        advantages, returns = core.gae(rewards, old_values, mask, hp.gamma, hp.lam)
        advantages = core.masked_whiten(advantages, mask)

        # 7. PPO epochs over shuffled minibatches, clipped policy and value losses.
        model.train()
        t0 = time.perf_counter()
        stats = ppo_update(model, run.optimizer, accelerator, rollout, old_logprobs, old_values, advantages, returns,
                           cfg)
        totals["update_s"] += time.perf_counter() - t0
        totals["update_tokens"] += hp.update_epochs * int(rollout.attention_mask.sum())

        # 8. Log the global batch's means, adapt the KL coefficient to them, evaluate, checkpoint for resume.
        local = {
            "score": raw_score.mean(),
            "kl": kl.sum(dim=1).mean(),
            "entropy": entropy,
            "explained_variance": core.explained_variance(old_values, returns, mask),
            "response_length": mask.sum(dim=1).float().mean(),
            "eos_rate": rollout.has_eos.float().mean(),
            **{k: torch.tensor(v) for k, v in stats.items()},
        }
        # Every process holds batch_size rollouts, so the mean of the per-process means is the global mean.
        means = accelerator.reduce(torch.stack([v.detach().float().to(device) for v in local.values()]), "mean")
        record = {"iteration": it + 1, "kl_coef": run.kl_ctl.value, **dict(zip(local, means.tolist()))}
        run.kl_ctl.update(record["kl"], run.global_batch)
        if (it + 1) % cfg.eval_every == 0 or it + 1 == run.n_iters:
            run.evals.append(evaluate(it + 1))
            record["eval_score"] = run.evals[-1]["score"]
            if "gold" in run.evals[-1]:
                record["eval_gold"] = run.evals[-1]["gold"]
        run.history.append(record)
        if it == 0 and hp.missing_eos_penalty and record["eos_rate"] < 2 / 3 and accelerator.is_main_process:
            # The penalty is about one std of the normalised score, so a policy that is often cut
            # off first learns to be short rather than better (measured on the demo: see README).
            log.warning("ppo: %.0f%% of the first rollouts hit ppo.max_new_tokens=%d without EOS and lose "
                        "ppo.missing_eos_penalty=%g each; raise ppo.max_new_tokens to the length of the policy's "
                        "replies (or lower the penalty)", 100 * (1 - record["eos_rate"]), hp.max_new_tokens,
                        hp.missing_eos_penalty)
        accelerator.log(record, step=it + 1)
        if accelerator.is_main_process:
            per_it = (time.perf_counter() - run_start) / (it + 1 - run.start_iter)
            held_out = f"  held-out score {record['eval_score']:.3f}" if "eval_score" in record else ""
            progress.say(f"ppo {it + 1}/{run.n_iters}: score {record['score']:.3f}  kl {record['kl']:.3f}  "
                         f"entropy {record['entropy']:.2f}  length {record['response_length']:.0f}{held_out}  "
                         f"({per_it:.1f}s/it, ~{per_it * (run.n_iters - it - 1) / 60:.0f} min left)")
        totals["wall_s"] = wall_before + time.perf_counter() - run_start
        faults.point(f"step-{it + 1}")
        if (it + 1) % cfg.train.save_steps == 0 and it + 1 < run.n_iters:
            _save_state(run, it + 1)


def publish(run: Run, store: ArtifactStore, reward_artifact: Artifact | None) -> Artifact | None:
    """The adapter, curves and metrics as checkpoints/<output>/vK, by the main process alone."""
    cfg, accelerator, totals, history, evals = run.cfg, run.accelerator, run.totals, run.history, run.evals
    policy_init, prompts_art = run.inputs.policy_init, run.inputs.prompts
    accelerator.wait_for_everyone()
    # Closes the trackers, so their files are complete; it also ends the process group, so it comes last.
    accelerator.end_training()
    training.let_collectives_settle(accelerator)
    if not accelerator.is_main_process:
        return None
    with store.create("checkpoint", cfg.output, stage="ppo", config=run.config) as w:
        run.unwrapped.policy.save_pretrained(w.path)
        models.make_portable(w.path, policy_init)
        run.tokenizer.save_pretrained(w.path)
        _save_curves(history, evals, w.path / training.LOGS_DIR)
        training.publish_tracking(run.scratch, w.path / training.LOGS_DIR)
        w.add_input("model", policy_init, loaded_as=models.loaded_as(store, policy_init))
        w.add_input("reference", policy_init)
        w.add_input("data", prompts_art)
        if run.inputs.eval_data:
            w.add_input("eval_data", run.inputs.eval_data)
        if reward_artifact:
            w.add_input("reward", reward_artifact)
        w.metrics.update({
            "iterations": run.n_iters,
            "eval_score_initial": evals[0]["score"] if evals and evals[0]["iteration"] == 0 else None,
            "eval_score": evals[-1]["score"] if evals else None,
            "eval_kl": evals[-1]["kl"] if evals else None,
            **({"eval_gold_initial": evals[0]["gold"] if evals[0]["iteration"] == 0 else None,
                "eval_gold": evals[-1]["gold"]} if evals and "gold" in evals[-1] else {}),
            "final_kl": history[-1]["kl"] if history else None,
            "prompts_truncated": totals["prompts_truncated"],
            "generation_tokens_per_s": totals["generation_tokens"] / max(totals["generation_s"], 1e-9),
            "update_tokens_per_s": totals["update_tokens"] / max(totals["update_s"], 1e-9),
            "wall_s": totals["wall_s"],
            "peak_mem_mb": training.peak_memory_mb(),
            "precision": run.inputs.precision,
            "padding_free": run.padding_free,
            "processes": accelerator.num_processes,
            "distributed": accelerator.distributed_type.value,
            "resumed_from_iteration": run.start_iter or None,
        })
    shutil.rmtree(run.scratch, ignore_errors=True)
    return w.result


def ppo_update(model, optimizer, accelerator, rollout: Rollout, old_logprobs, old_values, advantages, returns,
               cfg: PPOConfig) -> dict[str, float]:
    """Step 7: `ppo.update_epochs` passes over shuffled minibatches of one rollout batch; the mean losses and stats."""
    hp = cfg.ppo
    n = rollout.response_ids.shape[0]
    sums: dict[str, float] = {}
    count = 0
    for _ in range(hp.update_epochs):
        for idx in torch.randperm(n).split(hp.minibatch_size):
            mb = Rollout(rollout.prompt_ids[idx], rollout.prompt_mask[idx], rollout.response_ids[idx],
                         rollout.response_mask[idx], rollout.has_eos[idx])
            with accelerator.autocast():
                out = model(mb)
            pg_loss, pg_stats = core.ppo_policy_loss(out["logprobs"], old_logprobs[idx], advantages[idx],
                                                     mb.response_mask, hp.cliprange)
            vf_loss, vf_stats = core.ppo_value_loss(out["values"], old_values[idx], returns[idx],
                                                    mb.response_mask, hp.cliprange_value)
            loss = pg_loss + hp.vf_coef * vf_loss
            optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step = {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                    **{k: float(v) for k, v in {**pg_stats, **vf_stats}.items()}}
            for k, v in step.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def _evaluate(unwrapped: ActorCritic, generator: nn.Module, tokenizer, prompts: list, score_fn: RewardFn,
              cfg: PPOConfig, iteration: int, accelerator) -> dict:
    """Mean score and KL to the reference on held-out prompts, with a fixed sampling seed.

    Each process evaluates its own share of the prompts, and the shares are gathered, so
    every process returns the same means over all of them.
    """
    from accelerate.utils import gather_object

    hp = cfg.ppo
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.train.seed + accelerator.process_index)
    scores, kls, golds, samples = [], [], [], []
    with accelerator.split_between_processes(prompts[:cfg.eval_prompts]) as share:
        for i in range(0, len(share), cfg.train.batch_size):
            batch = share[i:i + cfg.train.batch_size]
            ids, mask, _ = encode_prompts(tokenizer, batch, hp.max_prompt_length)
            with accelerator.autocast():
                rollout = sample(generator, tokenizer, ids, mask, hp.max_new_tokens, hp.temperature,
                                 cache=hp.rollout_cache)
                logprobs = forward_response(unwrapped.policy, rollout, hp.temperature)["logprobs"]
                with unwrapped.policy.disable_adapter():
                    ref = forward_response(unwrapped.policy, rollout, hp.temperature)["logprobs"]
            texts = decode_responses(tokenizer, rollout)
            s = score_fn(batch, texts, rollout).float()
            scores += s.tolist()
            kls += ((logprobs - ref) * rollout.response_mask).sum(dim=1).tolist()
            if cfg.eval_gold:
                golds += [gold_score(p, t) for p, t in zip(batch, texts)]
            samples += [{"prompt": p[-1]["content"], "response": t, "score": float(v)}
                        for p, t, v in zip(batch, texts, s)]
    torch.set_rng_state(rng)
    scores, kls, golds, samples = (gather_object(x) for x in (scores, kls, golds, samples))
    return {"iteration": iteration, "score": sum(scores) / len(scores), "kl": sum(kls) / len(kls),
            **({"gold": sum(golds) / len(golds)} if golds else {}), "samples": samples[:cfg.samples_kept]}


def _prompt_batch(prompts: list, it: int, global_batch: int, batch_size: int, rank: int, seed: int) -> list:
    """Iteration `it`'s slice of an endless stream of seeded per-epoch shuffles."""
    n = len(prompts)
    start = it * global_batch + rank * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, j = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(prompts[perm[j]])
    return out


def _trainable_state(unwrapped: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad}


def _save_state(run: Run, iteration: int) -> None:
    """Trainable weights, optimizer, every process's RNG and logs, written to a temp file and renamed into place.

    Called on every process: each contributes its own RNG state, so that after a resume the
    processes sample their own streams again rather than all continuing the main one's.
    """
    from accelerate.utils import gather_object

    rngs = gather_object([torch.get_rng_state()])
    if not run.accelerator.is_main_process:
        return
    run.scratch.mkdir(parents=True, exist_ok=True)
    tmp = run.scratch / f".state-{iteration}.tmp"
    torch.save({"iteration": iteration, "trainable": _trainable_state(run.unwrapped),
                "optimizer": run.optimizer.state_dict(), "kl_coef": run.kl_ctl.value, "history": run.history,
                "evals": run.evals, "totals": run.totals, "rng": rngs}, tmp)
    faults.point(f"checkpoint-{iteration}")
    os.replace(tmp, run.scratch / "state.pt")


def _resume(run: Run) -> int:
    """The iteration a killed run's saved state reached (its weights, optimizer, logs and RNG restored), or 0."""
    path = run.scratch / "state.pt"
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False)
    params = dict(run.unwrapped.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    run.optimizer.load_state_dict(state["optimizer"])
    run.kl_ctl.value = state["kl_coef"]
    run.history.extend(state["history"])
    run.evals.extend(state["evals"])
    run.totals.update(state["totals"])
    rngs, accelerator = state["rng"], run.accelerator
    if len(rngs) == accelerator.num_processes:
        torch.set_rng_state(rngs[accelerator.process_index])
    else:  # resumed on another number of processes: fresh, distinct streams
        torch.manual_seed(state["iteration"] * 1009 + accelerator.process_index)
    log.warning("resuming from iteration %d (%s)", state["iteration"], path)
    return state["iteration"]


def _save_curves(history: list[dict], evals: list[dict], out_dir) -> None:
    """ppo_log.jsonl, evals.jsonl (with sample responses) and a PNG of score and KL per iteration."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / training.PPO_LOG).write_text("".join(json.dumps(r) + "\n" for r in history))
    (out_dir / training.PPO_EVALS).write_text("".join(json.dumps(e) + "\n" for e in evals))
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in history]
    gold = bool(evals) and all("gold" in e for e in evals)
    fig, axes = plt.subplots(1, 3 if gold else 2, figsize=(13.5 if gold else 9, 3.5))
    a, b = axes[0], axes[1]
    a.plot(its, [r["score"] for r in history], label="rollout score")
    a.plot([e["iteration"] for e in evals], [e["score"] for e in evals], "o-", label="held-out score")
    a.set_xlabel("iteration"), a.set_ylabel("normalised reward"), a.legend()
    b.plot(its, [r["kl"] for r in history], color="#c44e52")
    b.set_xlabel("iteration"), b.set_ylabel("KL to reference (nats / response)")
    if gold:
        # Gao et al. 2022's over-optimisation plot: the optimised proxy and a judge it never saw,
        # against the distance from the reference.
        kl = [e["kl"] for e in evals]
        axes[2].plot(kl, [e["score"] for e in evals], "o-", label="reward model (optimised)")
        axes[2].plot(kl, [e["gold"] for e in evals], "s-", label="gold scorer (never optimised)")
        axes[2].set_xlabel("held-out KL to reference (nats)"), axes[2].set_ylabel("held-out score")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "ppo_curves.png", dpi=100)
    plt.close(fig)
