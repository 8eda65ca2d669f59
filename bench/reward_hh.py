"""Reward model on real HH-RLHF data: the suite's `rlhf reward` against plain TRL, side by side.

    python -m bench.reward_hh                       # defaults below; ~30 min on a 2-core CPU
    python -m bench.reward_hh --steps 20 --dev-limit 60   # a quick look

Both train a LoRA reward model from the default SmolLM2-135M-Instruct on the same rows of
../shared/data/hh-rlhf-harmless/train.jsonl (the suite's training split), for the same
optimiser steps, batch size, sequence length and seed, then are scored the same way on
dev.jsonl. The baseline is `trl.RewardTrainer` with TRL's own defaults for everything else
(its learning rate, gradient checkpointing, its loss). Prints held-out accuracy and train
tokens/s for both, and the suite / baseline ratio; writes bench/results/reward_hh-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless"
RESULTS = Path(__file__).resolve().parent / "results"


def held_out_accuracy(model, tokenizer, rows, max_length: int) -> float:
    from rlhf.judges import raw_rewards

    chosen = raw_rewards(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows], 16, max_length)
    rejected = raw_rewards(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows], 16, max_length)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def run_suite(store, args) -> dict:
    from reward.train import main
    from rlhf.config import RewardConfig, load_config
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import load_tokenizer

    cfg = load_config(RewardConfig, None, [
        "model=base:latest", "data=hh-train:latest", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"max_length={args.max_length}", f"train.seed={args.seed}",
        f"train.eval_fraction={args.eval_fraction}", "normalization_samples=64", "bootstrap_samples=200"])
    art = main(cfg, store)
    m = art.manifest["metrics"]
    model = AutoModelForSequenceClassification.from_pretrained(art.path)
    return {"tokens_per_s": m["tokens_per_s"], "wall_s": m["wall_s"], "train_tokens": m["train_tokens"],
            "peak_mem_mb": m["peak_mem_mb"], "model": model, "tokenizer": load_tokenizer(art)}


def run_baseline(store, train_rows, args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from rlhf.models import load_sequence_classifier, load_tokenizer

    base = store.resolve("base:latest")
    tokenizer = load_tokenizer(base)
    torch.manual_seed(args.seed)
    model = load_sequence_classifier(store, base, pad_token_id=tokenizer.pad_token_id)
    out = Path(tempfile.mkdtemp(prefix="trl-baseline-"))
    # TRL's defaults for everything but the shared budget (steps, batch, length, seed) and the CPU flag.
    cfg = trl.RewardConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                           max_length=args.max_length, seed=args.seed, report_to=[], save_strategy="no",
                           use_cpu=not torch.cuda.is_available())
    trainer = trl.RewardTrainer(model=model, args=cfg, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(train_rows),
                                peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules="all-linear", task_type="SEQ_CLS"))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    from rlhf.training import peak_memory_mb

    return {"tokens_per_s": trainer._total_train_tokens / wall, "wall_s": wall,
            "train_tokens": trainer._total_train_tokens, "peak_mem_mb": peak_memory_mb(),
            "model": trainer.model.merge_and_unload(), "tokenizer": tokenizer,
            "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.bf16,
            "learning_rate": cfg.learning_rate}


def run_one(args) -> None:
    """One side of the comparison: train, score dev, write its figures to `args.result`."""
    from rlhf.artifacts import ArtifactStore
    from rlhf.data import load_rows, split_pairs, validate_file

    store = ArtifactStore(args.workspace)
    dev_rows = validate_file(SHARED / "dev.jsonl", "preferences", False, "hh")[0][:args.dev_limit]
    # The exact rows the suite trains on (its seeded split), so the baseline sees the same data.
    train = store.resolve("hh-train:latest")
    split = split_pairs(train, load_rows(train), args.eval_fraction, args.seed, ["prompt", "chosen", "rejected"],
                        stage="the benchmark")
    r = run_suite(store, args) if args.only == "suite" else run_baseline(store, list(split["train"]), args)
    r["metric"] = held_out_accuracy(r.pop("model"), r.pop("tokenizer"), dev_rows, args.max_length)
    r.update({"dev_pairs": len(dev_rows), "train_pairs": len(split["train"])})
    Path(args.result).write_text(json.dumps(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--dev-limit", type=int, default=300, help="score only the first N dev pairs")
    p.add_argument("--workspace", help="reuse a workspace that already holds base:latest")
    p.add_argument("--only", choices=["suite", "baseline"], help=argparse.SUPPRESS)  # one side, in a child process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        return run_one(args)

    import subprocess
    import sys

    from rlhf.artifacts import ArtifactStore
    from rlhf.data import import_dataset
    from rlhf.models import import_base

    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} not found: this benchmark needs ../shared/data beside the checkout")
    ws = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="bench-reward-"))
    store = ArtifactStore(ws)
    if not store.versions("checkpoint", "base"):
        import_base(store)
    import_dataset(store, "preferences", SHARED / "train.jsonl", name="hh-train", fmt="hh")

    # Each side runs in its own process, so peak memory and wall time are its own.
    results = {}
    for name in ("suite", "baseline"):
        out = ws / f"{name}.json"
        cmd = [sys.executable, "-m", "bench.reward_hh", "--only", name, "--workspace", str(ws), "--result", str(out),
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("steps", "batch_size", "max_length", "seed", "eval_fraction", "dev_limit")]]
        subprocess.run(cmd, check=True)
        results[name] = json.loads(out.read_text())
        r = results[name]
        print(f"{name}: dev accuracy {r['metric']:.3f}, {r['tokens_per_s']:.1f} train tokens/s", flush=True)
    dev_rows = [r.pop("dev_pairs") for r in results.values()][0]
    train_rows = [r.pop("train_pairs") for r in results.values()][0]
    ratio = {k: results["suite"][k] / results["baseline"][k] for k in ("tokens_per_s", "peak_mem_mb")}
    summary = {"args": vars(args), "dev_pairs": dev_rows, "train_pairs": train_rows, **results, "ratio": ratio}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"reward_hh-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2))
    print("\n| | dev accuracy | train tokens/s | peak RSS MB | wall s |\n|---|---|---|---|---|")
    for name in ("suite", "baseline"):
        r = results[name]
        print(f"| {name} | {r['metric']:.3f} | {r['tokens_per_s']:.1f} | {r['peak_mem_mb']:.0f} | {r['wall_s']:.0f} |")
    print(f"| suite / baseline | {results['suite']['metric'] - results['baseline']['metric']:+.3f} | "
          f"{ratio['tokens_per_s']:.2f}x | {ratio['peak_mem_mb']:.2f}x | |")
    print(f"\nwrote {out}")
    if not args.workspace:
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
