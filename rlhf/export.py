"""`rlhf export REF DIR`: a checkpoint as a standalone Hugging Face model directory, for serving.

    rlhf export dpo:latest served/dpo-v3                 # bf16 safetensors, tokenizer, model card
    rlhf export reward:latest served/rm --dtype fp32     # a sequence classifier, normalisation in the card

Adapters are merged into their base down the lineage, so the directory holds plain weights
under the base's own architecture (`config.json`), which vLLM, TGI and `transformers` load
as they are. Beside them: the tokenizer with its chat template, `generation_config.json`,
and `README.md`, a model card with the lineage, the configs, the metrics and every win-rate
a compare report measured for this checkpoint. DIR is written whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.errors import RlhfError

DTYPES = ("bf16", "fp16", "fp32")

# What each stage's checkpoint is, for the card.
METHODS = {
    "base import": "the base model, imported as it is",
    "sft": "supervised fine-tuning (TRL's SFTTrainer)",
    "dpo": "direct preference optimisation (Rafailov et al. 2023; TRL's DPOTrainer)",
    "ppo": "PPO against a reward model (Ouyang et al. 2022; the suite's own loop)",
    "reward": "a Bradley–Terry reward model (TRL's RewardTrainer)",
}


def check(store: ArtifactStore, ref: str, out: Path, dtype: str) -> Artifact:
    """Everything that can fail before a model loads: the ref, the target directory, the dtype."""
    if dtype not in DTYPES:
        raise RlhfError(f"export: --dtype {dtype} is not one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RlhfError(f"export: {out} already exists and is not an empty directory; choose a new one "
                        "(export never overwrites)")
    if not out.parent.is_dir():
        raise RlhfError(f"export: the parent directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise RlhfError(f"export: cannot write in {out.parent}; choose a directory you can write to")
    art = store.resolve(ref, kind="checkpoint")
    if (art.path / "adapter_config.json").is_file():
        from peft import PeftConfig

        if PeftConfig.from_pretrained(art.path).is_prompt_learning:
            raise RlhfError(f"{art.ref} is a prompt-learning adapter, whose virtual tokens cannot be merged into "
                            "weights, so it has no standalone export; export the checkpoint it was trained on")
    return art


def export(store: ArtifactStore, ref: str, out: str | Path, dtype: str = "bf16") -> tuple[Artifact, Path]:
    """Write `ref` to `out` as a standalone checkpoint; returns the checkpoint exported and the directory."""
    import torch

    from rlhf import models

    out = Path(out).resolve()
    art = check(store, ref, out, dtype)
    is_reward = art.manifest.get("stage") == "reward"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = models.load_tokenizer(art)
        if is_reward:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(art.path)
            # Servers read the raw score; the card and config.json say how the suite normalises it.
            model.config.reward_normalization = normalization(art)
        else:
            model = models.load_causal_lm(store, art)  # adapters merged down the lineage
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
        model.config.name_or_path = art.ref
        model.save_pretrained(tmp)  # safetensors: transformers 5 writes nothing else
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(store, art, dtype), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, as check() made sure
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return art, out


def normalization(art: Artifact) -> dict[str, float]:
    norm = art.manifest["metrics"]["normalization"]
    return {"mean": norm["mean"], "std": norm["std"]}


def win_rates(store: ArtifactStore, art: Artifact) -> list[dict[str, Any]]:
    """Every pairwise result a compare report holds for `art`, from its side."""
    rows = []
    for _, report, _ in store.scan():
        if report is None or report.manifest.get("stage") != "compare":
            continue
        m = report.manifest["metrics"]
        labels = [label for label, ref in m.get("models", {}).items() if ref == art.ref]
        for judge, result in m.get("judges", {}).items():
            for pair in result.get("pairs", []):
                for label in labels:
                    if label not in (pair["a"], pair["b"]):
                        continue
                    mine = pair["a"] == label
                    rate = pair["win_rate"] if mine else 1 - pair["win_rate"]
                    ci = pair["ci95"] if mine else [1 - pair["ci95"][1], 1 - pair["ci95"][0]]
                    rows.append({"report": report.ref, "judge": judge, "against": pair["b" if mine else "a"],
                                 "win_rate": rate, "ci95": ci, "n": pair["n"]})
    return rows


def model_card(store: ArtifactStore, art: Artifact, dtype: str) -> str:
    """`README.md` in the Hugging Face format: YAML metadata, then what the checkpoint is and how it was made."""
    import yaml

    stage = art.manifest.get("stage", "")
    is_reward = stage == "reward"
    meta = {"library_name": "transformers", "pipeline_tag": "text-classification" if is_reward else "text-generation",
            "tags": ["rlhf-suite", stage.replace(" ", "-")] + (["reward-model"] if is_reward else [])}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {art.name} v{art.version}", "",
             f"Exported by rlhf-suite from `{art.ref}` (content @{art.content_hash[:12]}) on "
             f"{dt.date.today().isoformat()}, as {dtype} safetensors. "
             f"Method: {METHODS.get(stage, stage)}.", ""]
    if is_reward:
        norm = normalization(art)
        lines += ["## Reward normalisation", "",
                  "The model outputs one raw score per conversation (read at its last token). The suite uses",
                  f"`(raw - {norm['mean']:.6g}) / {norm['std']:.6g}`: 0 is an average response of the training "
                  "data, 1 one standard deviation better. `config.json` holds the same numbers as "
                  "`reward_normalization`.", ""]
    lines += ["## Lineage", "", "From `rlhf artifacts lineage`: every input, back to the base model and raw data.", "",
              "```text", store.lineage(art.ref), "```", ""]
    metrics = {k: v for k, v in art.manifest.get("metrics", {}).items() if isinstance(v, (int, float))}
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    rates = win_rates(store, art)
    if rates:
        lines += ["## Win-rates", "", "From `rlhf compare` reports that include this checkpoint.", "",
                  "| report | judge | against | win rate | 95% CI | prompts |", "|---|---|---|---:|---|---:|"]
        lines += [f"| {r['report']} | {r['judge']} | {r['against']} | {r['win_rate']:.3f} | "
                  f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['n']} |" for r in rates]
        lines.append("")
    lines += ["## Configuration", "", f"The resolved config of `{stage}`:", "", "```yaml",
              yaml.safe_dump(art.manifest.get("config", {}), sort_keys=False, allow_unicode=True).strip(), "```", ""]
    loader = "AutoModelForSequenceClassification" if is_reward else "AutoModelForCausalLM"
    lines += ["## Use", "", "```python", f"from transformers import {loader}, AutoTokenizer", "",
              f'model = {loader}.from_pretrained("<this directory>")',
              'tokenizer = AutoTokenizer.from_pretrained("<this directory>")  # with its chat template', "```", ""]
    return "\n".join(lines)
