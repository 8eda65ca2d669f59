"""`python -m bench`: the suite against the plain-library baseline, stage by stage, in one run.

    python -m bench                          # every stage on the packaged SmolLM2-135M-Instruct
    python -m bench --stages sft,reward      # a subset
    python -m bench --repeats 3              # medians over 3 runs of each side
    python -m bench --quick                  # each stage just long enough to be measured

Each side of each stage runs in its own process (`bench/stages.py`) on the same work. The
machine's matmul peak is measured first; every stage reports tokens/s, peak memory, wall
time, its metric and MFU, and the suite / baseline ratio. Results go to
`bench/results/<timestamp>.json` (one fixed shape, to compare over time) and `.md`.

Data: SFT and PPO use the demo data (rlhf/demo_data); reward and DPO use the real
`../shared/data/hh-rlhf-harmless` preference pairs for realistic lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.stages import STAGES

RESULTS = Path(__file__).resolve().parent / "results"
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless"
DEMO_DATA = Path(__file__).resolve().parents[1] / "rlhf" / "demo_data"

# The shared work per stage. steps: optimiser steps; batch_size: rows per step (the PPO
# minibatch for ppo_update); rollout_prompts: prompts per rollout batch.
BUDGET = {"steps": 8, "batch_size": 8, "learning_rate": 2e-4, "max_length": 256, "seed": 42, "eval_fraction": 0.1,
          "dev_limit": 100, "rollout_prompts": 16, "max_new_tokens": 48}
# Runs per side, medians reported: the short PPO phases are noisy from run to run, and cheap.
REPEATS = {"ppo_rollout": 3, "ppo_update": 3}
QUICK = {"steps": 2, "batch_size": 2, "dev_limit": 8, "rollout_prompts": 4, "max_new_tokens": 8, "max_length": 128}


def prepare(ws: Path, model: str | None, stages: list[str]) -> None:
    """The workspace both sides read: the base model and the datasets the chosen stages need."""
    from rlhf.artifacts import ArtifactStore
    from rlhf.data import import_dataset
    from rlhf.models import import_base

    store = ArtifactStore(ws)
    import_base(store, model)
    import_dataset(store, "sft", DEMO_DATA / "support_sft.jsonl", name="sft")
    import_dataset(store, "prompts", DEMO_DATA / "support_prompts.jsonl", name="prompts")
    if {"reward", "dpo"} & set(stages):
        if not HH.is_dir():
            raise SystemExit(f"error: {HH} not found; the reward and dpo benchmarks read its real preference pairs "
                             "(put ../shared/data beside the checkout, or pass --stages sft,ppo_rollout,ppo_update)")
        import_dataset(store, "preferences", HH / "train.jsonl", name="prefs", fmt="hh", skip_invalid=True)
        import_dataset(store, "preferences", HH / "dev.jsonl", name="prefs-dev", fmt="hh", skip_invalid=True)


def run_side(stage: str, side: str, ws: Path, budget: dict) -> dict:
    out = ws / f"{stage}-{side}.json"
    argv = [sys.executable, "-m", "bench.stages", stage, side, str(ws), json.dumps(budget), str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: bench stage {stage} ({side}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def median_run(runs: list[dict], peak_gflops: float) -> dict:
    """Medians over repeats; MFU from the median throughput."""
    r = {k: statistics.median(x[k] for x in runs) for k in ("tokens_per_s", "peak_mem_mb", "wall_s", "metric")}
    flops_per_token = runs[0]["flops"] / runs[0]["tokens"]
    r["mfu"] = r["tokens_per_s"] * flops_per_token / (peak_gflops * 1e9)
    r.update({"metric_name": runs[0]["metric_name"], "tokens": runs[0]["tokens"], "repeats": len(runs)})
    return r


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m.get('cpu_model') or m['cpu']}, {m['threads']} threads, torch {m['torch']}; matmul peak "
             f"{m['peak_gflops']['bf16']:.0f} GFLOP/s bf16, {m['peak_gflops']['fp32']:.0f} fp32; the stages compute "
             f"in {m['precision']}, whose peak is MFU's denominator. {result['date']}."
             + (f" Suite overrides: {' '.join(result['budget']['suite'])}." if result["budget"].get("suite") else ""),
             "", "| stage | side | tokens/s | peak MB | wall s | metric | MFU |", "|---|---|---|---|---|---|---|"]
    for stage, s in result["stages"].items():
        for side in ("suite", "baseline"):
            r = s[side]
            lines.append(f"| {stage} | {side} | {r['tokens_per_s']:.1f} | {r['peak_mem_mb']:.0f} | {r['wall_s']:.1f} | "
                         f"{r['metric']:.3f} ({r['metric_name']}) | {100 * r['mfu']:.1f}% |")
        q = s["ratio"]
        lines.append(f"| {stage} | **suite / baseline** | **{q['tokens_per_s']:.2f}×** | {q['peak_mem_mb']:.2f}× | "
                     f"{q['wall_s']:.2f}× | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from bench.peak import machine, mfu_peak_gflops

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the harness, not the speed")
    p.add_argument("--repeats", type=int, help="runs per side, medians reported (default: 3 for the PPO phases, "
                                                "1 for the trainers; 1 with --quick)")
    p.add_argument("--model", help="a local transformers checkpoint instead of the packaged SmolLM2-135M-Instruct")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and markdown go")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"budget overrides; keys: {', '.join(BUDGET)}")
    p.add_argument("--suite", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for the suite side of the trainer stages, to measure one of its levers "
                        "off (e.g. padding_free=false)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := [s for s in stages if s not in STAGES]:
        raise SystemExit(f"error: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    budget = {**BUDGET, **(QUICK if args.quick else {})}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in BUDGET:
            raise SystemExit(f"error: unknown budget key {key!r}; choose from {', '.join(BUDGET)}")
        budget[key] = type(BUDGET[key])(value)
    budget["suite"] = args.suite

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget": budget, "machine": machine(args.quick),
              "stages": {}}
    peak = mfu_peak_gflops(result["machine"])
    print(f"matmul peak: {result['machine']['peak_gflops']['bf16']:.0f} GFLOP/s bf16, "
          f"{result['machine']['peak_gflops']['fp32']:.0f} fp32; MFU against {result['machine']['precision']}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        ws = Path(tmp)
        prepare(ws, args.model, stages)
        for stage in stages:
            sides = {}
            for side in ("suite", "baseline"):
                repeats = args.repeats or (1 if args.quick else REPEATS.get(stage, 1))
                runs = [run_side(stage, side, ws, budget) for _ in range(repeats)]
                sides[side] = median_run(runs, peak)
                print(f"{stage} {side}: {sides[side]['tokens_per_s']:.1f} tokens/s, {sides[side]['metric_name']} "
                      f"{sides[side]['metric']:.3f}", flush=True)
            ratio = {k: sides["suite"][k] / sides["baseline"][k] for k in ("tokens_per_s", "peak_mem_mb", "wall_s")}
            result["stages"][stage] = {**sides, "ratio": ratio}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stamp}.md").write_text(table(result) + "\n")
    print("\n" + table(result) + f"\n\nwrote {args.out / stamp}.json")
    return result


if __name__ == "__main__":
    main()
