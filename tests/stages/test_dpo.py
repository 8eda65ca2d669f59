"""`rlhf dpo` on a tiny random Llama: the implicit reward learns a toy preference held out."""

from __future__ import annotations

import math

from conftest import rlhf
from rlhf.artifacts import ArtifactStore


def test_dpo_raises_held_out_reward_accuracy_above_0_9(pref_ws):
    assert rlhf(pref_ws, "sft", "train.max_steps=20", "train.learning_rate=1e-2", "max_length=256") == 0
    assert rlhf(pref_ws, "dpo", "model=sft:latest", "train.max_steps=40", "train.learning_rate=5e-3",
                "train.eval_fraction=0.2", "max_length=256", "beta=0.1", "kl_prompts=8", "max_new_tokens=16") == 0
    art = ArtifactStore(pref_ws).resolve("dpo:latest")
    m = art.manifest["metrics"]
    assert m["eval_reward_accuracy"] > 0.9
    assert m["eval_reward_margin"] > m["eval_reward_margin_initial"]
    assert m["eval_kl_to_reference"] is not None and math.isfinite(m["eval_kl_to_reference"])
    roles = {i["role"]: i["ref"] for i in art.manifest["inputs"]}
    assert roles == {"model": "checkpoints/sft:v1", "reference": "checkpoints/sft:v1",
                     "data": "datasets/preferences:v1"}
    assert (art.path / "adapter_model.safetensors").is_file()


def test_dpo_loss_type_passes_through_and_bad_ones_are_refused(pref_ws, capsys):
    assert rlhf(pref_ws, "dpo", "model=base:latest", "loss_type=not_a_loss", "train.max_steps=1") == 2
    assert "not a TRL DPO loss" in capsys.readouterr().err
    assert rlhf(pref_ws, "dpo", "model=base:latest", "loss_type=ipo", "train.max_steps=2", "max_length=128",
                "kl_prompts=2", "max_new_tokens=4") == 0
    assert ArtifactStore(pref_ws).resolve("dpo:latest").manifest["config"]["loss_type"] == "ipo"


def test_dpo_freeze_mode_keeps_a_frozen_reference(pref_ws):
    assert rlhf(pref_ws, "dpo", "model=base:latest", "mode=freeze", "freeze.trainable_layers=1", "train.max_steps=4",
                "max_length=128", "kl_prompts=2", "max_new_tokens=4", "train.eval_fraction=0.2") == 0
    m = ArtifactStore(pref_ws).resolve("dpo:latest").manifest["metrics"]
    assert m["mode"] == "freeze" and m["trainable_params"] < m["total_params"]
