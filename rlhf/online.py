"""What the online RL stages share (`rlhf rloo`, `rlhf grpo`): TRL's RLOOTrainer and GRPOTrainer
on the suite's policy, reward checkpoint and prompts.

    rlhf rloo                                   # sft:latest + reward:latest + prompts:latest -> checkpoints/rloo/vK
    rlhf grpo num_generations=8 beta=0.02

Each step samples `num_generations` completions of every prompt from the policy (the input
checkpoint plus a new LoRA adapter), scores each with the reward checkpoint's normalised score
(`rlhf.judges.RewardModel`) minus `missing_eos_penalty` when it was cut off without EOS, and
takes the prompt's group as the baseline: RLOO the mean of the other completions (Ahmadian et
al. 2024, "Back to Basics"), GRPO the group's mean, divided by its std (Shao et al. 2024,
DeepSeekMath). The reference of the KL term is the policy with its adapter disabled, as in DPO
and PPO, so no second copy is loaded. A killed run resumes from its trainer checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Callable, Sequence

from rlhf import data as rdata
from rlhf import models, training
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import OnlineRLConfig, dump
from rlhf.errors import RlhfError

# (prompts, completion texts, completion token ids) -> one score per completion. The CLI scores
# with a reward checkpoint; tests pass toy scores.
ScoreFn = Callable[[list, list[str], list[list[int]]], Sequence[float]]

# TRL fields the online stages set from their own keys (beyond those every TRL stage sets).
STAGE_KEYS = {"num_generations": "num_generations", "num_generations_eval": "num_generations", "beta": "beta",
              "temperature": "temperature", "max_completion_length": "max_new_tokens", "reward_weights": "eval_gold"}


@dataclass
class Inputs:
    """An online stage's checked inputs: precision, policy, reward checkpoint, and the prompts kept."""

    precision: str
    policy: Artifact
    reward: Artifact | None
    prompts: Artifact
    train_rows: list[dict]
    eval_rows: list[dict]
    too_long: int  # prompts over max_prompt_length, left out
    eval_data: Artifact | None  # the held-out prompts' dataset, with eval_data=


def check(cfg: OnlineRLConfig, store: ArtifactStore, library_config: type, stage: str,
          with_reward: bool = True) -> Inputs:
    """Everything that can fail before a model loads (also run on every sweep trial first).

    `with_reward=False` is for `train` with a score function of its own (the tests' toy rewards).
    """
    from rlhf.judges import check_reward_checkpoint

    training.check_trl_keys(cfg, library_config, STAGE_KEYS)
    training.check_trackers(cfg.report.to)
    models.check_launch()
    models.check_mode(cfg.mode)
    precision = models.resolve_precision(cfg.train.precision)
    store.check_writable()
    policy = models.check_policy(store.resolve(cfg.model, kind="checkpoint"))
    tokenizer = models.load_tokenizer(policy)  # has a chat template
    reward = check_reward_checkpoint(store.resolve(cfg.reward, kind="checkpoint")) if with_reward else None
    prompts = store.resolve(cfg.data, kind="dataset")
    train_rows, eval_rows, held_out = rdata.prompt_sets(store, prompts, cfg.eval_data, cfg.train.eval_fraction,
                                                        cfg.train.seed, stage=stage)
    # TRL does not cut prompts, so one longer than the model can take would fail mid-run.
    kept = []
    for rows in (train_rows, eval_rows):
        lengths = training.chat_lengths(tokenizer, [r["prompt"] for r in rows], add_generation_prompt=True)
        kept.append([r for r, n in zip(rows, lengths) if n <= cfg.max_prompt_length])
    too_long = len(train_rows) + len(eval_rows) - len(kept[0]) - len(kept[1])
    if not kept[0] or not kept[1]:
        side, source = ("training", prompts.ref) if not kept[0] else ("held-out", cfg.eval_data or prompts.ref)
        raise RlhfError(f"every {side} prompt of {source} is longer than max_prompt_length={cfg.max_prompt_length} "
                        "tokens; raise max_prompt_length")
    return Inputs(precision, policy, reward, prompts, kept[0], kept[1][:cfg.eval_prompts], too_long, held_out)


class RewardFunction:
    """TRL's reward-function interface over a score function, with the missing-EOS penalty.

    Generation stops at EOS or at `max_new_tokens`, and TRL keeps the EOS in `completion_ids`,
    so a completion whose last token is not an EOS was cut off.
    """

    __name__ = "reward"  # TRL names the logged reward columns after the function

    def __init__(self, score: ScoreFn, eos_ids: set[int], missing_eos_penalty: float):
        self.score, self.eos_ids, self.missing_eos_penalty = score, eos_ids, missing_eos_penalty

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], **_) -> list[float]:
        scores = self.score(prompts, [_text(c) for c in completions], completion_ids)
        return [float(s) - (self.missing_eos_penalty if not ids or ids[-1] not in self.eos_ids else 0.0)
                for s, ids in zip(scores, completion_ids)]


def gold(prompts: list, completions: list, **_) -> list[float]:
    """The demo's gold scorer as a TRL reward function; given weight 0, it is logged, never optimised."""
    from rlhf.judges import gold_score

    return [gold_score(p, _text(c)) for p, c in zip(prompts, completions)]


def reward_model_score(store: ArtifactStore, ref: str, batch_size: int) -> tuple[ScoreFn, Artifact]:
    """The reward checkpoint's normalised score, as a `ScoreFn`."""
    from rlhf.judges import RewardModel

    reward = RewardModel(store, ref)
    return (lambda prompts, texts, _ids: reward.score(prompts, texts, batch_size=batch_size)), reward.artifact


def train(cfg: OnlineRLConfig, store: ArtifactStore, stage: str, trainer_class: type, library_config: type,
          score: ScoreFn | None = None, inputs: Inputs | None = None) -> Artifact | None:
    """Train `stage` ("rloo" or "grpo") with its TRL trainer and publish; None on all but the main process.

    `score` None scores with `cfg.reward`; a caller with a score function of its own passes it.
    """
    from datasets import Dataset
    from peft import LoraConfig

    # 1. Check everything that can fail before any model loads.
    inputs = inputs or check(cfg, store, library_config, stage.upper(), with_reward=score is None)
    reward_art = None
    if score is None:
        score, reward_art = reward_model_score(store, cfg.reward, cfg.train.batch_size * cfg.num_generations)

    # 2. Policy = input weights + a new adapter (no dropout: the sampled and trained log-probs
    #    must be the same function); reference = the policy with the adapter off.
    tokenizer = models.load_tokenizer(inputs.policy)
    model = models.load_causal_lm(store, inputs.policy, mode=cfg.mode)
    peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                             target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    eos_ids = {i for i in [tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))]
               if i is not None}
    reward_fn = RewardFunction(score, eos_ids, cfg.missing_eos_penalty)

    # 3. Train, resuming an identical killed run. A batch is `batch_size` prompts, each answered
    #    num_generations times; held-out prompts are answered as often, and scored the same way.
    config = dump(cfg)
    scratch = store.scratch_dir(stage, training.run_id(
        config, [inputs.policy, inputs.prompts, *([reward_art] if reward_art else [])]))
    completions = cfg.train.batch_size * cfg.num_generations
    kwargs = training.trainer_kwargs(cfg.train, scratch, inputs.precision, has_eval=True, report_to=cfg.report.to)
    kwargs.update(per_device_train_batch_size=completions, per_device_eval_batch_size=completions)
    # With eval_gold the gold scorer rides along at weight 0: TRL logs it beside the reward, per
    # step and held out, and the advantages are the reward model's alone.
    reward_funcs, weights = ([reward_fn, gold], [1.0, 0.0]) if cfg.eval_gold else ([reward_fn], None)
    args = library_config(**kwargs, num_generations=cfg.num_generations, num_generations_eval=cfg.num_generations,
                          beta=cfg.beta, temperature=cfg.temperature, max_completion_length=cfg.max_new_tokens,
                          reward_weights=weights, **cfg.trl)
    columns = lambda rows: Dataset.from_list([{"prompt": r["prompt"], "prompt_id": r["prompt_id"]} for r in rows])
    trainer = trainer_class(model=model, reward_funcs=reward_funcs, args=args, train_dataset=columns(inputs.train_rows),
                            eval_dataset=columns(inputs.eval_rows), processing_class=tokenizer,
                            peft_config=peft_config)
    _seeded_evaluations(trainer, cfg.train.seed)
    done = training.fit(trainer, scratch, cfg.train)
    if done is None:  # only the main process publishes
        return None
    initial, final = done.initial, done.final

    # 4. Publish the adapter, its lineage and the held-out reward, KL and length before and after.
    run_metrics = training.run_metrics(trainer, done.run, inputs.precision)
    # TRL's online trainers count prompt and completion tokens in the trainer state, which a
    # resumed run restores, so this covers the whole run.
    run_metrics["train_tokens"] = int(trainer.state.num_input_tokens_seen)
    run_metrics["tokens_per_s"] = run_metrics["train_tokens"] / done.run.wall_s
    with store.create("checkpoint", cfg.output, stage=stage, config=config) as w:
        trainer.model.save_pretrained(w.path)
        models.make_portable(w.path, inputs.policy)
        tokenizer.save_pretrained(w.path)
        training.save_logs(trainer, scratch, w.path / training.LOGS_DIR)
        w.add_input("model", inputs.policy, loaded_as=models.loaded_as(store, inputs.policy))
        w.add_input("reference", inputs.policy)
        if reward_art is not None:
            w.add_input("reward", reward_art)
        w.add_input("data", inputs.prompts)
        if inputs.eval_data:
            w.add_input("eval_data", inputs.eval_data)
        w.metrics.update({
            # The reward model's score alone (TRL's `reward` is the weighted sum, the same here).
            "eval_reward_initial": initial.get("eval_rewards/reward/mean"),
            "eval_reward": final.get("eval_rewards/reward/mean"),
            **({"eval_gold_initial": initial.get("eval_rewards/gold/mean"),
                "eval_gold": final.get("eval_rewards/gold/mean")} if cfg.eval_gold else {}),
            "eval_kl_initial": initial.get("eval_kl"),
            "eval_kl": final.get("eval_kl"),
            "eval_length_initial": initial.get("eval_completions/mean_length"),
            "eval_length": final.get("eval_completions/mean_length"),
            "eval_clipped_ratio": final.get("eval_completions/clipped_ratio"),
            "train_prompts": len(inputs.train_rows),
            "eval_prompts": len(inputs.eval_rows),
            "prompts_too_long": inputs.too_long,
            "mode": cfg.mode,
            **done.stop,
            **run_metrics,
        })
    shutil.rmtree(scratch, ignore_errors=True)
    return w.result


def _seeded_evaluations(trainer, seed: int) -> None:
    """Every evaluation samples from the same seed, on an RNG stream of its own.

    The held-out reward before and after training is then measured on the same draws, and an
    evaluation neither shifts the training's samples nor depends on where training stopped: a
    run resumed from its last checkpoint measures what the uninterrupted run measured.
    """
    import torch

    evaluate = trainer.evaluate

    def seeded(*args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return evaluate(*args, **kwargs)

    trainer.evaluate = seeded


def _text(completion) -> str:
    """A completion as TRL passes it to reward functions: the assistant message's text (or the text itself)."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple, set)) else [value]
