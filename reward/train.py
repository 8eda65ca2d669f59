"""`rlhf reward`: a Bradley–Terry reward model with TRL's RewardTrainer.

    rlhf reward                                      # sft:latest + preferences:latest -> checkpoints/reward/vK
    rlhf reward --config configs/reward.yaml train.max_steps=100 center_coef=0.01
    rlhf reward model=base:latest data=hh:latest mode=full
    rlhf reward mode=freeze freeze.trainable_layers=4                # top 4 blocks + the score head
    rlhf reward data=[preferences:latest,hh:latest] data_weights=[0.8,0.2]
    rlhf reward train.eval_steps=20 train.early_stopping_patience=3 # stop on held-out pairwise loss
    rlhf reward eval_data=hh-dev:latest                              # also score an explicit held-out set

The model is a one-output sequence classifier initialised from the input checkpoint. A pair longer
than max_length keeps the last max_length tokens of each side (`truncation=left`; `drop` skips it,
as TRL does), and the decoder runs each batch's sequences packed into shared rows instead of
padded (`padding_free`, where the model keeps packed sequences apart; checked on load). After
training it is scored on a held-out split it never saw: pairwise accuracy with a bootstrap
95% CI, accuracy by margin bucket, calibration (ECE), and the mean/std of its rewards on
the training responses, saved as the normalisation that `rlhf score` and PPO apply.

Calibration: a temperature T fitted on every held-out pair (the split, and `eval_data=` when given)
makes σ((r_c − r_r) / T) a calibrated preference probability (temperature scaling, Guo et al.
2017). It is stored beside the normalisation (`rlhf score` reports each pair's calibrated
P(chosen ≻ rejected)); ranking and accuracy do not change. The calibrated ECEs are cross-fitted:
each half of the held-out pairs is scaled with the temperature fitted on the other half, so no
pair is measured with a temperature fitted to it. `eval_data=` scores an explicit held-out
dataset too (accuracy, CI, ECE before and after).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from reward.loss import expected_calibration_error, fit_temperature, preference_probability, reward_loss
from rlhf import data as rdata
from rlhf import finetune, models, progress, training
from rlhf.errors import RlhfError
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import RewardConfig, dump
from rlhf.judges import raw_rewards


def _trainer_class():
    import trl

    class PairwiseRewardTrainer(training.length_grouped(trl.RewardTrainer)):
        """TRL's RewardTrainer with the loss from `reward/loss.py` (margin and centering included)."""

        def __init__(self, *args, center_coef: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.center_coef = center_coef

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            margin = inputs.pop("margin", None)
            outputs = model(**inputs, use_cache=False)
            # The collator stacks all chosen rows, then all rejected rows.
            rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
            loss, stats = reward_loss(rewards_chosen, rewards_rejected, margin, self.center_coef)
            if mode == "train":
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            for key, value in stats.items():
                self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())
            return (loss, outputs) if return_outputs else loss

    return PairwiseRewardTrainer


def check(cfg: RewardConfig, store: ArtifactStore) -> tuple[training.Inputs, tuple[Artifact, list] | None]:
    """Everything that can fail before any work is done (also run on every trial of a sweep first).

    Returns the training inputs and, with `eval_data=`, that dataset and its pairs.
    """
    import trl

    inputs = training.prepare_inputs(cfg, store, trl.RewardConfig, schema="preferences", task_type="SEQ_CLS")
    if not cfg.eval_data:
        return inputs, None
    held_out = store.resolve(cfg.eval_data, kind="dataset")
    if held_out.ref in {d.ref for d in inputs.datasets}:
        raise RlhfError(f"eval_data={cfg.eval_data} is {held_out.ref}, which is also training data; "
                        "pass a dataset the model does not train on (e.g. a dev set)")
    return inputs, (held_out, rdata.load_rows(held_out, schema="preferences"))


def main(cfg: RewardConfig, store: ArtifactStore) -> Artifact | None:
    import trl

    # 1. Check everything that can fail before any work is done.
    inputs, eval_set = check(cfg, store)
    init = inputs.model

    # 2. A held-out split per dataset that the model never trains on, the same for the same seed.
    use_margin = cfg.use_margin and all(r.get("margin") is not None for rows in inputs.rows for r in rows)
    columns = ["prompt", "chosen", "rejected"] + (["margin"] if use_margin else [])
    split, data_mix = training.split_and_mix(inputs, cfg, lambda dataset, rows: rdata.split_pairs(
        dataset, rows, cfg.train.eval_fraction, cfg.train.seed, columns, stage="a reward model"))

    # 3. Tokenised as TRL would, over-long pairs cut or dropped; then whether the longest batch needs
    #    checkpointing.
    tokenizer = models.load_tokenizer(init)
    train_set, too_long = _tokenized(tokenizer, split["train"], cfg)
    eval_split, _ = _tokenized(tokenizer, split["test"], cfg)
    if not len(train_set):
        raise RlhfError(f"all {too_long} training pairs of {', '.join(d.ref for d in inputs.datasets)} are longer "
                        f"than max_length={cfg.max_length} tokens; raise max_length or set truncation=left")
    longest = max(max(len(c), len(r)) for c, r in zip(train_set["chosen_ids"], train_set["rejected_ids"]))
    # Each batch holds the chosen and the rejected side of every pair; packed, never more tokens than that.
    checkpointing, why = training.checkpointing_decision(
        cfg.train.gradient_checkpointing, models.model_config(store, init), 2 * cfg.train.batch_size, longest)

    # 4. Model: the input checkpoint with a new one-output head, and the training mode on top.
    model = models.load_sequence_classifier(store, init, cfg.mode, pad_token_id=tokenizer.pad_token_id,
                                            seed=cfg.train.seed)
    peft_config, mode_facts = finetune.prepare(cfg, model, task_type="SEQ_CLS")

    # 5. Train, resuming an identical killed run from its scratch checkpoints.
    config = dump(cfg)
    scratch = store.scratch_dir("reward", training.run_id(config, [init, *inputs.datasets]))
    args = trl.RewardConfig(**training.trainer_kwargs(cfg.train, scratch, inputs.precision, has_eval=True,
                                                      gradient_checkpointing=checkpointing, report_to=cfg.report.to),
                            max_length=cfg.max_length, **cfg.trl)
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_set, eval_dataset=eval_split,
                               processing_class=tokenizer, peft_config=peft_config, center_coef=cfg.center_coef,
                               callbacks=training.callbacks(cfg.train))
    with training.fused_lora_on_cpu(trainer.model, keep_weights=not args.gradient_checkpointing), \
            training.packed_where_safe(trainer.model, cfg.padding_free) as packing:
        run = training.train_resumable(trainer, scratch)

    trainer.accelerator.wait_for_everyone()
    training.let_collectives_settle(trainer.accelerator)
    if not trainer.accelerator.is_main_process:
        return None

    # 6. Held-out evaluation and normalisation statistics, from text like every later scorer.
    run_metrics = training.run_metrics(trainer, run, inputs.precision)  # before the merge folds the adapter away
    stop = training.stop_metrics(trainer, cfg.train)
    out_model = trainer.model.merge_and_unload() if peft_config else trainer.model
    held_out = len(split["test"]) + (len(eval_set[1]) if eval_set else 0)
    with progress.phase(f"reward: scoring {held_out} held-out pairs and "
                        f"{min(cfg.normalization_samples, 2 * len(split['train']))} training responses"):
        metrics, margins = evaluate(out_model, tokenizer, split, cfg, eval_set)
    with store.create("checkpoint", cfg.output, stage="reward", config=config) as w:
        # Saved merged, so scoring loads one standalone classifier (no adapter chain to follow).
        out_model.save_pretrained(w.path)
        tokenizer.save_pretrained(w.path)
        training.save_logs(trainer, scratch, w.path / training.LOGS_DIR)
        write_report(metrics, w.path / "report", margins)
        w.add_input("model", init, loaded_as=models.loaded_as(store, init))
        for dataset in inputs.datasets:
            w.add_input("data", dataset)
        if eval_set:
            w.add_input("eval_data", eval_set[0])
        w.metrics.update(metrics)
        w.metrics.update({
            "train_pairs": len(trainer.train_dataset),
            "train_pairs_too_long": too_long,  # cut or dropped, as `truncation` says
            "eval_pairs": len(split["test"]),
            **({"data_mix": data_mix} if len(data_mix) > 1 else {}),
            "used_margin": use_margin,
            **mode_facts,
            "gradient_checkpointing": {"enabled": checkpointing, "reason": why},
            "padding_free": packing,
            **stop,
            **run_metrics,
        })
    shutil.rmtree(scratch, ignore_errors=True)
    return w.result


def _conversations(rows, side: str) -> list:
    return [r["prompt"] + r[side] for r in rows]


def _tokenized(tokenizer, pairs, cfg: RewardConfig):
    """`pairs` as TRL tokenises them (the chat template over prompt + response: `chosen_ids`,
    `rejected_ids`, and `margin` where there is one), with each pair longer than max_length cut
    to the last max_length tokens of each side (truncation=left) or dropped (drop); and how many
    pairs were too long. Cutting from the left keeps the replies being compared, and is how
    `rlhf score`, PPO and this stage's own evaluation read a long conversation."""
    from datasets import Dataset

    chosen, rejected = (tokenizer.apply_chat_template(_conversations(pairs, side), tokenize=True, return_dict=False)
                        for side in ("chosen", "rejected"))
    margins = pairs["margin"] if "margin" in pairs.column_names else None
    rows, too_long = [], 0
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        if max(len(c), len(r)) > cfg.max_length:
            too_long += 1
            if cfg.truncation == "drop":
                continue
        rows.append({"chosen_ids": c[-cfg.max_length:], "rejected_ids": r[-cfg.max_length:],
                     **({"margin": margins[i]} if margins is not None else {})})
    columns = ["chosen_ids", "rejected_ids"] + (["margin"] if margins is not None else [])
    return Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in columns}), too_long


def evaluate(model, tokenizer, split, cfg: RewardConfig, eval_set: tuple[Artifact, list] | None = None
             ) -> tuple[dict, list[float]]:
    """Held-out accuracy (+ bootstrap CI), accuracy by margin bucket, ECE before and after temperature
    scaling, normalisation stats, and the same on `eval_set`; and each held-out pair's reward margin
    r_c − r_r, for the report's histogram."""
    import numpy as np

    test, train = list(split["test"]), list(split["train"])
    packing = training.padding_free_decision(model, cfg.padding_free)  # once, for every scoring below
    score = lambda convs: torch.tensor(raw_rewards(model, tokenizer, convs, cfg.train.batch_size, cfg.max_length,
                                                   packing))
    r_c, r_r = score(_conversations(test, "chosen")), score(_conversations(test, "rejected"))
    margins = r_c - r_r
    correct = (margins > 0).float().numpy()
    eval_loss, loss_stats = reward_loss(r_c, r_r)
    if eval_set:
        dataset, rows = eval_set
        chosen, rejected = _conversations(rows, "chosen"), _conversations(rows, "rejected")
        e_c, e_r = score(chosen), score(rejected)
    # One temperature from every held-out pair: on HH a 120-pair split alone fitted T = 2.5 where
    # its 299 dev pairs wanted 1.3, and left the dev ECE worse than unscaled (0.056 against 0.047).
    held_out_margins = torch.cat([margins, e_c - e_r]) if eval_set else margins
    temperature = fit_temperature(held_out_margins)
    scaled = _cross_fitted(held_out_margins)
    # Normalisation over training responses (chosen and rejected), so 0 = an average response.
    # A seeded sample keeps this cheap on large sets; its mean and std estimate the full set's.
    responses = _conversations(train, "chosen") + _conversations(train, "rejected")
    rng = np.random.default_rng(cfg.train.seed)
    sample = rng.choice(len(responses), size=min(cfg.normalization_samples, len(responses)), replace=False)
    train_rewards = score([responses[i] for i in sorted(sample)])
    metrics = {
        "eval_accuracy": float(correct.mean()),
        "eval_accuracy_ci95": _bootstrap_ci(correct, cfg),
        "eval_ece": float(expected_calibration_error(preference_probability(r_c, r_r))),
        "eval_ece_calibrated": _ece(scaled[:len(test)]) if scaled is not None else None,
        "eval_mean_margin": float(loss_stats["margin"]),
        "eval_loss": float(eval_loss),
        "normalization": {"mean": float(train_rewards.mean()), "std": float(train_rewards.std().clamp(min=1e-6))},
        "calibration": {"temperature": temperature, "fitted_on_pairs": len(held_out_margins)},
    }
    if "margin" in split["test"].column_names:
        metrics["eval_accuracy_by_margin"] = accuracy_by_bucket(np.array(split["test"]["margin"]), correct)
    if eval_set:
        lengths = zip(*(training.chat_lengths(tokenizer, convs) for convs in (chosen, rejected)))
        held_out_correct = (e_c > e_r).float().numpy()
        metrics["eval_data"] = {
            "ref": dataset.ref, "pairs": len(rows),
            # Scored left-truncated, as every later scorer does; training would have dropped them.
            "pairs_longer_than_max_length": sum(max(c, r) > cfg.max_length for c, r in lengths),
            "accuracy": float(held_out_correct.mean()), "accuracy_ci95": _bootstrap_ci(held_out_correct, cfg),
            "ece": float(expected_calibration_error(preference_probability(e_c, e_r))),
            "ece_calibrated": _ece(scaled[len(test):]) if scaled is not None else None,
        }
    return metrics, margins.tolist()


def _bootstrap_ci(correct, cfg: RewardConfig) -> list[float]:
    """Percentile-bootstrap 95% CI of the mean of 0/1 outcomes (the mean twice when it cannot vary)."""
    import numpy as np
    from scipy import stats

    ci = stats.bootstrap((correct,), np.mean, confidence_level=0.95, n_resamples=cfg.bootstrap_samples,
                         method="percentile", random_state=cfg.train.seed).confidence_interval
    return [float(ci.low), float(ci.high)] if not np.isnan(ci.low) else [float(correct.mean())] * 2


def _cross_fitted(margins: torch.Tensor) -> torch.Tensor | None:
    """Each margin divided by the temperature fitted on the other half of the pairs (alternate
    pairs form the halves); None with fewer than 4 pairs."""
    if len(margins) < 4:
        return None
    halves = torch.arange(len(margins)) % 2 == 0, torch.arange(len(margins)) % 2 == 1
    scaled = torch.empty_like(margins)
    for mine, other in (halves, halves[::-1]):
        scaled[mine] = margins[mine] / fit_temperature(margins[other])
    return scaled


def _ece(scaled_margins: torch.Tensor) -> float:
    return float(expected_calibration_error(torch.sigmoid(scaled_margins)))


def accuracy_by_bucket(values, correct, n_buckets: int = 3) -> dict[str, dict]:
    """Accuracy within quantile buckets of `values` (e.g. annotator-agreement margin)."""
    import numpy as np

    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_buckets + 1)))
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bucket = (values >= lo) & ((values <= hi) if hi == edges[-1] else (values < hi))
        if in_bucket.any():
            out[f"[{lo:.2f}, {hi:.2f}]"] = {"n": int(in_bucket.sum()), "accuracy": float(correct[in_bucket].mean())}
    return out


def write_report(metrics: dict, out_dir: Path, margins: list[float]) -> None:
    """A short summary.md and a histogram of held-out reward margins r_c − r_r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(margins, bins=30, color="#4c72b0")
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("held-out reward margin  r(chosen) − r(rejected)")
    ax.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(out_dir / "margin_hist.png", dpi=100)
    plt.close(fig)
    lo, hi = metrics["eval_accuracy_ci95"]
    lines = [
        "# Reward model: held-out evaluation",
        "",
        f"- pairwise accuracy: {metrics['eval_accuracy']:.3f} (95% bootstrap CI {lo:.3f}–{hi:.3f})",
        f"- expected calibration error of σ(r_c − r_r): {metrics['eval_ece']:.3f}; after temperature "
        f"scaling (T = {metrics['calibration']['temperature']:.3f}, cross-fitted): {_fmt(metrics['eval_ece_calibrated'])}",
        f"- mean margin: {metrics['eval_mean_margin']:.3f}",
        f"- normalisation (training responses): mean {metrics['normalization']['mean']:.3f}, "
        f"std {metrics['normalization']['std']:.3f}",
    ]
    for bucket, v in metrics.get("eval_accuracy_by_margin", {}).items():
        lines.append(f"- accuracy at margin {bucket}: {v['accuracy']:.3f} (n={v['n']})")
    if held_out := metrics.get("eval_data"):
        lo, hi = held_out["accuracy_ci95"]
        lines += ["", f"## {held_out['ref']} ({held_out['pairs']} pairs)", "",
                  f"- pairwise accuracy: {held_out['accuracy']:.3f} (95% bootstrap CI {lo:.3f}–{hi:.3f})",
                  f"- ECE: {held_out['ece']:.3f}; after temperature scaling (cross-fitted): "
                  f"{_fmt(held_out['ece_calibrated'])}",
                  f"- pairs longer than max_length (scored left-truncated): "
                  f"{held_out['pairs_longer_than_max_length']}"]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
