"""Training modes on a tiny random Llama: each one learns, and changes only the weights it should.

    freeze      top N blocks + head train; every other weight is bit-identical afterwards
    peft        ia3 and prompt tuning through `peft.method`, options passed through to peft
    bad input   one line naming the setting and the fix, exit 2, no checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rlhf
from rlhf.artifacts import ArtifactStore

FAST = ["train.batch_size=8", "max_length=256", "train.logging_steps=2"]


def weights(ws: Path, name: str, version: int = 1) -> dict[str, torch.Tensor]:
    return load_file(ws / "checkpoints" / name / f"v{version:04d}" / "model.safetensors")


def metrics(ws: Path, ref: str) -> dict:
    return ArtifactStore(ws).resolve(ref).manifest["metrics"]


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_freeze_trains_the_top_block_and_head_and_leaves_the_rest_bit_identical(tiny_ws):
    assert rlhf(tiny_ws, "sft", "mode=freeze", "freeze.trainable_layers=1", "train.max_steps=10",
                "train.learning_rate=1e-3", *FAST) == 0
    base, tuned = weights(tiny_ws, "base"), weights(tiny_ws, "sft")
    m = metrics(tiny_ws, "checkpoints/sft:latest")
    assert m["eval_loss"] < 0.97 * m["eval_loss_initial"]

    # The bottom block is untouched to the bit; every tensor of the top block, the final norm and
    # the (tied) head/embedding moved.
    top = {k for k in base if k.startswith("model.layers.1.")}
    head = {"model.norm.weight", "model.embed_tokens.weight"}
    assert changed(base, tuned) == top | head
    assert all(torch.equal(base[k], tuned[k]) for k in base if k.startswith("model.layers.0."))
    assert m["trainable_params"] == sum(base[k].numel() for k in top | head)
    assert m["total_params"] == sum(t.numel() for t in base.values())
    assert m["mode"] == "freeze"
    assert m["freeze"] == {"trainable_layers": 1, "of_layers": 2, "head": True, "head_tied_to_embeddings": True}


def test_freeze_with_the_head_frozen_trains_only_the_top_block(tiny_ws):
    assert rlhf(tiny_ws, "sft", "mode=freeze", "freeze.trainable_layers=1", "freeze.head=false",
                "train.max_steps=6", "train.learning_rate=1e-3", *FAST) == 0
    base, tuned = weights(tiny_ws, "base"), weights(tiny_ws, "sft")
    assert changed(base, tuned) == {k for k in base if k.startswith("model.layers.1.")}


def test_feature_extraction_reward_model_trains_only_its_score_head_and_final_norm(pref_ws):
    """freeze.trainable_layers=0 on a reward model: the backbone is a fixed feature extractor."""
    assert rlhf(pref_ws, "reward", "model=base:latest", "mode=freeze", "freeze.trainable_layers=0",
                "train.max_steps=30", "train.learning_rate=1e-2", "train.eval_fraction=0.2", "max_length=320",
                "bootstrap_samples=100", "normalization_samples=16") == 0  # 320: every marker pair fits whole
    base, tuned = weights(pref_ws, "base"), weights(pref_ws, "reward")
    assert changed(base, {k: tuned[k] for k in base if k in tuned}) == {"model.norm.weight"}
    m = metrics(pref_ws, "reward:latest")
    assert m["trainable_params"] == tuned["score.weight"].numel() + base["model.norm.weight"].numel()
    # The head alone, on random features, still separates the marker from its absence.
    assert m["eval_accuracy"] > 0.7


@pytest.mark.parametrize("method, options, lr", [
    ("ia3", [], "1e-1"),
    ("prompt_tuning", ["peft.num_virtual_tokens=8"], "1e-1"),
])
def test_peft_method_trains_only_its_adapter(tiny_ws, method, options, lr):
    assert rlhf(tiny_ws, "sft", "mode=peft", f"peft.method={method}", *options, "train.max_steps=30",
                f"train.learning_rate={lr}", *FAST) == 0
    art = ArtifactStore(tiny_ws).resolve("checkpoints/sft:latest")
    m = art.manifest["metrics"]
    assert m["eval_loss"] < m["eval_loss_initial"] - 0.1
    assert m["mode"] == "peft" and m["peft_method"] == method
    # Only the adapter is saved, and it holds exactly the parameters that trained.
    assert not (art.path / "model.safetensors").exists()
    adapter = load_file(art.path / "adapter_model.safetensors")
    assert m["trainable_params"] == sum(t.numel() for t in adapter.values())
    assert 0 < m["trainable_params"] < 0.01 * m["total_params"]
    assert json.loads((art.path / "adapter_config.json").read_text())["peft_type"] == method.upper()


def test_ia3_merged_changes_only_its_target_modules(tiny_ws):
    assert rlhf(tiny_ws, "sft", "mode=peft", "peft.method=ia3", "peft.target_modules=[v_proj,down_proj]",
                "peft.feedforward_modules=[down_proj]", "merge=true", "train.max_steps=10",
                "train.learning_rate=1e-1", *FAST) == 0
    base, tuned = weights(tiny_ws, "base"), weights(tiny_ws, "sft")
    assert changed(base, tuned) == {f"model.layers.{i}.{m}.weight" for i in (0, 1)
                                    for m in ("self_attn.v_proj", "mlp.down_proj")}


def test_prompt_tuned_policy_generates_but_cannot_be_trained_on(tiny_ws, tmp_path, capsys):
    from conftest import DEMO_DATA

    assert rlhf(tiny_ws, "sft", "mode=peft", "peft.method=prompt_tuning", "peft.num_virtual_tokens=4",
                "train.max_steps=2", *FAST) == 0
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in (DEMO_DATA / "support_prompts.jsonl").read_text().splitlines()[:2]]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rlhf(tiny_ws, "data", "import", "prompts", str(prompts)) == 0
    assert rlhf(tiny_ws, "generate", "k=1", "sampling.max_new_tokens=4") == 0
    capsys.readouterr()
    assert rlhf(tiny_ws, "sft", "model=sft:v1", "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert "prompt_tuning adapter" in err and "start from checkpoints/base:v1" in err


@pytest.mark.parametrize("args, expected", [
    (["mode=freeze", "freeze.trainable_layers=5"],
     "freeze.trainable_layers=5 but checkpoints/base:v1 has 2 transformer blocks; use a value from 0 to 2"),
    (["mode=peft", "peft.method=ia3", "peft.target_modulez=[q_proj]"],
     "unknown key 'peft.target_modulez' for IA3Config; did you mean 'peft.target_modules'"),
    (["mode=peft", "peft.method=ia3", "peft.target_modules=[q_proj]", "peft.feedforward_modules=[down_proj]"],
     "peft.method=ia3 rejects these options: "),
    (["mode=peft", "peft.method=lorra"], "peft.method=lorra is not a peft method; did you mean lora"),
    (["mode=peft", "peft.method=ia3", "peft.task_type=SEQ_CLS"], "peft.task_type is set by the stage itself"),
    (["mode=peft", "peft.method=prompt_tuning", "merge=true"], "cannot be merged into the weights; remove merge=true"),
    (["data=[sft:latest, other:latest]", "data_weights=[1]"], "data_weights has 1 weight(s) but data names 2"),
    (["data=[sft:latest, other:latest]"], "no artifact named 'other' in datasets"),
    (["mode=frozen"], "mode:"),
])
def test_bad_mode_or_mix_settings_fail_in_one_line_and_publish_nothing(tiny_ws, capsys, args, expected):
    assert rlhf(tiny_ws, "sft", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tiny_ws / "checkpoints" / "sft").exists()
    assert not (tiny_ws / ".scratch").exists()


def test_reward_refuses_a_prompt_learning_method(pref_ws, capsys):
    assert rlhf(pref_ws, "reward", "model=base:latest", "mode=peft", "peft.method=prompt_tuning") == 2
    err = capsys.readouterr().err
    assert "cannot be merged; use a weight adapter" in err and "\n" not in err.strip()
    assert not (pref_ws / "checkpoints" / "reward").exists()
