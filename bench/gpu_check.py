"""`python -m bench.gpu_check`: every stage once on one CUDA GPU, with its speed and memory, offline.

    python -m bench.gpu_check                 # a random ~0.5B Llama and the packaged SmolLM2, on the GPU
    python -m bench.gpu_check --cpu-smoke     # the same checks on a tiny model on the CPU (a test runs it)

On a random-initialised Llama of about 0.5B parameters built from a config (and on the
packaged SmolLM2-135M-Instruct), it runs sft (lora, qlora, full), reward, dpo, ppo with the
merged sampler (dynamic and static KV cache), generate and compare, then the FSDP (sft, and
ppo, which samples through the adapter when sharded) and ZeRO-3 launch configs with one
process. Each check reports tokens/s, MFU against the GPU's measured bf16 matmul peak and peak
CUDA memory; SFT and the PPO rollout also run their plain-library baseline (bench/stages.py)
for the suite / baseline ratio. One JSON and one markdown table go to --out (bench/results/ by
default).

Nothing is downloaded: the models are the packaged GGUF and one built from a config, the data
the demo's. What it needs beyond `make setup` is in the README ("GPU acceptance check").

`--cpu-smoke` swaps in a 2-layer model and 2-step budgets and skips what needs CUDA (qlora,
FSDP, DeepSpeed; the static cache runs uncompiled), so the harness cannot rot on a machine
without a GPU. Its figures check the harness, not the hardware; on the CPU peak memory is the
process's peak RSS, which only grows, so it is not reported per check.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "rlhf" / "demo_data"

# ~0.48B parameters: 24 layers of 17.2M (GQA attention 3.9M, SwiGLU MLP 13.3M) and a 63M tied embedding.
LLAMA_05B = {"hidden_size": 1280, "intermediate_size": 3456, "num_hidden_layers": 24, "num_attention_heads": 20,
             "num_key_value_heads": 4}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
# Optimiser steps (or PPO iterations), rows per step and sequence length of each check.
GPU_BUDGET = {"steps": 30, "batch_size": 8, "max_length": 512, "ppo_iterations": 6, "max_new_tokens": 64,
              "prompts": 64}
SMOKE_BUDGET = {"steps": 2, "batch_size": 2, "max_length": 128, "ppo_iterations": 2, "max_new_tokens": 4,
                "prompts": 8}


# -- the workspace ---------------------------------------------------------------------------

def build_llama(out: Path, tokenizer, shape: dict) -> Path:
    """A random-initialised Llama of `shape`, with the packaged tokenizer and its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def mismatched_pairs(out: Path) -> Path:
    """Preference pairs from the demo's SFT set: chosen = the reply written for the prompt,
    rejected = the reply written for the next prompt. Learnable and the demo's own lengths."""
    convs = [json.loads(line)["messages"] for line in (DEMO_DATA / "support_sft.jsonl").read_text().splitlines()]
    with open(out, "w") as f:
        for conv, other in zip(convs, convs[1:] + convs[:1]):
            f.write(json.dumps({"prompt": conv[:-1], "chosen": [conv[-1]], "rejected": [other[-1]]}) + "\n")
    return out


def prepare(ws: Path, smoke: bool) -> dict[str, Any]:
    """base = the random Llama, smollm2 = the packaged model (GPU only); the demo's data; preference pairs."""
    from rlhf.artifacts import ArtifactStore
    from rlhf.data import import_dataset
    from rlhf.models import default_gguf, gguf_tokenizer, import_base

    store = ArtifactStore(ws)
    tokenizer = gguf_tokenizer(default_gguf())
    import_base(store, build_llama(ws.parent / "llama", tokenizer, TINY if smoke else LLAMA_05B), name="base")
    if not smoke:
        import_base(store, name="smollm2")
    import_dataset(store, "sft", DEMO_DATA / "support_sft.jsonl", name="sft")
    import_dataset(store, "prompts", DEMO_DATA / "support_prompts.jsonl", name="prompts")
    import_dataset(store, "prompts", DEMO_DATA / "support_prompts_heldout.jsonl", name="heldout")
    pairs = mismatched_pairs(ws.parent / "pairs.jsonl")
    import_dataset(store, "preferences", pairs, name="prefs")
    import_dataset(store, "preferences", pairs, name="prefs-dev")  # bench.stages.reward scores its dev split
    from bench.stages import matmul_params
    from rlhf import models

    n = matmul_params(models.load_causal_lm(store, store.resolve("base:latest")))
    return {"params_matmul": n, "vocab": len(tokenizer)}


# -- the checks ------------------------------------------------------------------------------

def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def measured(run: Callable[[], dict]) -> dict:
    """`run()`'s figures, its wall time and, on a GPU, its own peak CUDA memory."""
    import torch

    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = run()
    out["wall_s"] = time.perf_counter() - start
    out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda() else None
    return out


def cli_stage(ws: Path, *args: str, metric: str = "tokens_per_s") -> Callable[[], dict]:
    """A stage through the real CLI, in this process; its figures from the manifest it published."""
    def run() -> dict:
        from rlhf import cli
        from rlhf.artifacts import ArtifactStore

        before = {a.ref for a in ArtifactStore(ws).list()}
        if (rc := cli.main(["--workspace", str(ws), *args])) != 0:
            raise RuntimeError(f"rlhf {' '.join(args)} exited {rc}")
        new = [a for a in ArtifactStore(ws).list() if a.ref not in before]
        m = new[-1].manifest["metrics"]
        return {"artifact": new[-1].ref, "tokens_per_s": m.get(metric), **{k: m[k] for k in KEPT if k in m}}
    return run


KEPT = ("eval_loss", "eval_accuracy", "eval_reward_accuracy", "eval_score_initial", "eval_score", "eval_kl",
        "generation_tokens_per_s", "update_tokens_per_s", "generated_tokens_per_s", "precision", "train_tokens")


def bench_pair(ws: Path, stage: str, budget: dict) -> Callable[[], dict]:
    """bench/stages.py's suite and plain-library sides of `stage`, each in its own process."""
    def run() -> dict:
        from bench.__main__ import run_side

        suite, baseline = (run_side(stage, side, ws, budget) for side in ("suite", "baseline"))
        return {"tokens_per_s": suite["tokens_per_s"], "baseline_tokens_per_s": baseline["tokens_per_s"],
                "ratio": suite["tokens_per_s"] / baseline["tokens_per_s"],
                "flops_per_token": suite["flops"] / suite["tokens"],
                "peak_mem_mb_suite": suite["peak_mem_mb"], "peak_mem_mb_baseline": baseline["peak_mem_mb"]}
    return run


def launched(ws: Path, config: str, *args: str, metric: str = "tokens_per_s") -> Callable[[], dict]:
    """A stage under `accelerate launch --config_file configs/accelerate/<config>` with one process."""
    def run() -> dict:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / config), "--num_processes", "1", "-m", "rlhf.cli",
               "--workspace", str(ws), *args]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        from rlhf.artifacts import ArtifactStore

        output = next(a.split("=", 1)[1] for a in args if a.startswith("output="))
        m = ArtifactStore(ws).resolve(f"{output}:latest").manifest["metrics"]
        return {"tokens_per_s": m[metric], "distributed": m.get("distributed"),
                "peak_mem_mb_process": m.get("peak_mem_mb")}
    return run


def checks(ws: Path, b: dict, smoke: bool) -> list[tuple[str, str | None, Callable[[], dict], str]]:
    """(name, why it is skipped or None, run, its FLOPs-per-token formula: a `flops_per_token` key or '')."""
    steps = [f"train.max_steps={b['steps']}", f"train.batch_size={b['batch_size']}", f"max_length={b['max_length']}",
             "train.save_steps=100000", "report.to=none"]
    no_cuda = "needs CUDA" if not cuda() else None
    from bench.__main__ import BUDGET

    has_deepspeed = _importable("deepspeed")
    ppo = ["ppo", "model=base:latest", "reward=reward:latest", "data=prompts:latest", "eval_data=heldout:latest",
           f"train.max_steps={b['ppo_iterations']}", f"train.batch_size={b['batch_size']}", "ppo.minibatch_size=2",
           f"ppo.max_new_tokens={b['max_new_tokens']}", f"eval_prompts={b['batch_size']}",
           f"eval_every={b['ppo_iterations']}", "train.save_steps=100000", "report.to=none"]
    bench_budget = {**BUDGET, "steps": b["steps"], "batch_size": b["batch_size"], "max_length": b["max_length"],
                    "dev_limit": 16, "rollout_prompts": b["prompts"], "max_new_tokens": b["max_new_tokens"]}
    return [
        ("sft lora", None, cli_stage(ws, "sft", "model=base:latest", "mode=lora", "output=sft-lora", *steps), "lora"),
        ("sft qlora", no_cuda, cli_stage(ws, "sft", "model=base:latest", "mode=qlora", "output=sft-qlora", *steps),
         "lora"),
        ("sft full", None, cli_stage(ws, "sft", "model=base:latest", "mode=full", "output=sft-full", *steps), "full"),
        ("sft suite / plain TRL", None, bench_pair(ws, "sft", bench_budget), ""),
        ("reward", None, cli_stage(ws, "reward", "model=base:latest", "data=prefs:latest", *steps,
                                   "bootstrap_samples=100", "normalization_samples=32"), "reward"),
        ("dpo", None, cli_stage(ws, "dpo", "model=base:latest", "data=prefs:latest", *steps, "kl_prompts=4",
                                f"max_new_tokens={b['max_new_tokens']}"), "dpo"),
        ("ppo (merged sampler)", None, cli_stage(ws, *ppo, "output=ppo", metric="generation_tokens_per_s"), "gen"),
        # Compiled by transformers on CUDA; on a CPU the same static-cache path runs uncompiled.
        ("ppo (static KV cache)", None,
         cli_stage(ws, *ppo, "output=ppo-static", "ppo.rollout_cache=static", metric="generation_tokens_per_s"), "gen"),
        ("ppo rollout suite / HF generate", None, bench_pair(ws, "ppo_rollout", bench_budget), ""),
        ("generate", None, cli_stage(ws, "generate", "model=sft-lora:latest", "data=prompts:latest", "k=2",
                                     f"limit={b['prompts']}", f"sampling.max_new_tokens={b['max_new_tokens']}",
                                     metric="generated_tokens_per_s"), "gen"),
        ("compare", None, cli_stage(ws, "compare", "sft-lora:latest", "dpo:latest", "data=heldout:latest",
                                    "judge=gold,reward:reward:latest", f"limit={b['prompts']}",
                                    f"sampling.max_new_tokens={b['max_new_tokens']}", "bootstrap_samples=100",
                                    metric="none"), ""),
        ("smollm2 sft lora", "the packaged model is covered on the CPU by the integration tier" if smoke else None,
         cli_stage(ws, "sft", "model=smollm2:latest", "output=smollm2-sft", *steps), "lora"),
        ("smollm2 generate", "the packaged model is covered on the CPU by the integration tier" if smoke else None,
         cli_stage(ws, "generate", "model=smollm2-sft:latest", "data=prompts:latest", "k=2", f"limit={b['prompts']}",
                   f"sampling.max_new_tokens={b['max_new_tokens']}", "output=smollm2-candidates",
                   metric="generated_tokens_per_s"), "gen"),
        ("fsdp (configs/accelerate/fsdp.yaml)", no_cuda,
         launched(ws, "fsdp.yaml", "sft", "model=base:latest", "mode=full", "output=sft-fsdp", *steps), "full"),
        # Sharded PPO cannot keep a merged copy of the policy: it samples through the adapter.
        ("ppo under fsdp", no_cuda, launched(ws, "fsdp.yaml", *ppo, "output=ppo-fsdp", metric="generation_tokens_per_s"),
         "gen"),
        ("zero3 (configs/accelerate/zero3.yaml)", no_cuda or (None if has_deepspeed else "deepspeed is not installed"),
         launched(ws, "zero3.yaml", "sft", "model=base:latest", "mode=full", "output=sft-zero3", *steps), "full"),
    ]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- the report ------------------------------------------------------------------------------

def flops_per_token(kind: str, n: int, vocab_x_hidden: int) -> float | None:
    """Model FLOPs per token (bench/stages.py's formulas): LoRA training 4·N, full 6·N, DPO 6·N
    (the reference's forward 2·N on top), reward 4·N without the vocabulary matrix, sampling 2·N."""
    return {"lora": 4 * n, "full": 6 * n, "dpo": 6 * n, "reward": 4 * (n - vocab_x_hidden), "gen": 2 * n}.get(kind)


def table(result: dict) -> str:
    m = result["machine"]
    mem = lambda x: f"{x:,.0f}" if isinstance(x, (int, float)) else "–"
    lines = [f"{result['mode']}: {m.get('gpu') or m.get('cpu_model') or m['cpu']}, torch {m['torch']}; {m['precision']} "
             f"matmul peak {m['peak_gflops'][m['precision']]:,.0f} GFLOP/s; model {result['model']['params_matmul'] / 1e6:.0f}M "
             f"matmul parameters. {result['date']}.", "",
             "| check | result | tokens/s | MFU | peak CUDA MB | suite / baseline | notes |",
             "|---|---|---:|---:|---:|---:|---|"]
    for c in result["checks"]:
        tps = f"{c['tokens_per_s']:,.0f}" if c.get("tokens_per_s") else "–"
        mfu = f"{100 * c['mfu']:.1f}%" if c.get("mfu") is not None else "–"
        ratio = f"{c['ratio']:.2f}×" if c.get("ratio") else "–"
        note = c.get("skipped") or c.get("error") or ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
            if k in ("eval_loss", "eval_accuracy", "eval_reward_accuracy", "eval_score", "distributed"))
        lines.append(f"| {c['name']} | {c['status']} | {tps} | {mfu} | {mem(c.get('peak_mem_mb'))} | {ratio} | "
                     f"{note} |")
    if (q := result.get("qlora_vs_lora_memory")) is not None:
        lines += ["", f"QLoRA / LoRA peak CUDA memory: {q:.2f}×"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from bench.peak import machine, mfu_peak_gflops

    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model and 2-step budgets on the CPU")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and markdown go")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not cuda():
        raise SystemExit("error: no CUDA GPU found; run with --cpu-smoke to check the harness on the CPU")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = SMOKE_BUDGET if args.cpu_smoke else GPU_BUDGET
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu-smoke" if args.cpu_smoke
                              else "gpu", "budget": budget, "machine": machine(quick=args.cpu_smoke), "checks": []}
    peak = mfu_peak_gflops(result["machine"]) * 1e9
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ws = Path(tmp) / "ws"
        result["model"] = prepare(ws, args.cpu_smoke)
        shape = TINY if args.cpu_smoke else LLAMA_05B
        n, vh = result["model"]["params_matmul"], result["model"]["vocab"] * shape["hidden_size"]
        for name, skipped, run, kind in checks(ws, budget, args.cpu_smoke):
            entry: dict[str, Any] = {"name": name}
            if skipped:
                entry.update(status="skipped", skipped=skipped)
            else:
                print(f"gpu_check: {name} ...", flush=True)
                try:
                    entry.update(status="ok", **measured(run))
                except Exception as e:  # one failed check must not hide the others' figures
                    traceback.print_exc()
                    entry.update(status="failed", error=f"{e.__class__.__name__}: {str(e)[:300]}")
            per_token = entry.get("flops_per_token") or flops_per_token(kind, n, vh)
            if entry.get("tokens_per_s") and per_token:
                entry["mfu"] = entry["tokens_per_s"] * per_token / peak
            result["checks"].append(entry)
            print(f"gpu_check: {name}: {entry['status']}", flush=True)
    result["wall_s"] = time.perf_counter() - start
    by = {c["name"]: c for c in result["checks"]}
    if by["sft qlora"].get("peak_mem_mb") and by["sft lora"].get("peak_mem_mb"):
        result["qlora_vs_lora_memory"] = by["sft qlora"]["peak_mem_mb"] / by["sft lora"]["peak_mem_mb"]
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = f"gpu-check{'-cpu-smoke' if args.cpu_smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stamp}.md").write_text(table(result) + "\n")
    print("\n" + table(result) + f"\n\nwrote {args.out / stamp}.json ({result['wall_s']:.0f} s)")
    failed = [c["name"] for c in result["checks"] if c["status"] == "failed"]
    if failed:
        raise SystemExit(f"error: {len(failed)} check(s) failed: {', '.join(failed)}")
    return result


if __name__ == "__main__":
    main()
