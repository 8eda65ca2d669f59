"""The whole loop on model families other than Llama, each with SmolLM2's real tokenizer and
chat template: import -> sft -> generate -> reward -> dpo -> ppo -> compare.

The layer names differ per family (Qwen2's q/k/v/o, GPT-NeoX's fused `query_key_value` and
untied `embed_out`, Phi-3's fused `qkv_proj` and `gate_up_proj`), which is what `all-linear`
LoRA, the classifier head and the samplers must cope with.
"""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_DATA, TINY_ARCHS, build_tiny_arch, rlhf, write_marker_preferences
from rlhf.artifacts import ArtifactStore

# Linear layers of each family that `all-linear` must adapt (the LM head stays untouched).
LINEARS = {
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_the_whole_loop_runs_on(arch, tmp_path, smollm2_tokenizer_dir):
    ws = tmp_path / "ws"
    model_dir = build_tiny_arch(tmp_path / arch, arch, smollm2_tokenizer_dir)
    assert rlhf(ws, "base", "import", str(model_dir)) == 0
    assert rlhf(ws, "data", "import", "sft", str(DEMO_DATA / "support_sft.jsonl")) == 0
    assert rlhf(ws, "data", "import", "preferences", str(write_marker_preferences(tmp_path / "p.jsonl", n=40))) == 0
    assert rlhf(ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts_heldout.jsonl")) == 0
    store = ArtifactStore(ws)
    assert store.resolve("base:latest").manifest["metrics"]["has_chat_template"]

    assert rlhf(ws, "sft", "train.max_steps=8", "train.batch_size=4", "max_length=192",
                "train.learning_rate=5e-3") == 0
    sft = store.resolve("checkpoints/sft:latest")
    adapter = json.loads((sft.path / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == LINEARS[arch]
    # Learning happened: held-out loss on the completions fell.
    assert sft.manifest["metrics"]["eval_loss"] < sft.manifest["metrics"]["eval_loss_initial"]

    assert rlhf(ws, "generate", "model=sft:latest", "k=2", "limit=3", "sampling.max_new_tokens=8") == 0
    assert store.resolve("candidates:latest").manifest["metrics"]["responses"] > 0
    assert rlhf(ws, "reward", "model=sft:latest", "train.max_steps=2", "train.batch_size=4", "max_length=192",
                "bootstrap_samples=100", "normalization_samples=16") == 0
    # Each family keeps sequences packed into one row apart, so the reward model trains padding-free.
    assert store.resolve("checkpoints/reward:latest").manifest["metrics"]["padding_free"]["enabled"]
    assert rlhf(ws, "dpo", "model=sft:latest", "train.max_steps=2", "train.batch_size=4", "max_length=192",
                "kl_prompts=2", "max_new_tokens=4") == 0
    assert rlhf(ws, "ppo", "model=sft:latest", "train.max_steps=2", "train.batch_size=4", "ppo.minibatch_size=2",
                "ppo.max_new_tokens=6", "eval_every=100", "eval_prompts=2", "ppo.value_init=reward") == 0
    ppo = store.resolve("checkpoints/ppo:latest")
    history = [json.loads(line) for line in (ppo.path / "logs" / "ppo_log.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(h["kl"] == h["kl"] for h in history)  # finite, not NaN
    assert ppo.manifest["metrics"]["padding_free"]["enabled"]  # rollouts: left-padded prompts, right-padded replies
    assert rlhf(ws, "compare", "sft:latest", "dpo:latest", "ppo:latest", "data=prompts:latest", "limit=4",
                "sampling.max_new_tokens=8", "bootstrap_samples=100", "judge=gold,reward:latest") == 0
    report = json.loads((store.resolve("compare:latest").path / "metrics.json").read_text())
    assert len(report["judges"]["gold"]["pairs"]) == 3


def test_a_tokenizer_without_chat_template_is_refused_until_one_is_given(tmp_path, tiny_model_dir, capsys):
    import shutil

    from conftest import CHAT_TEMPLATE

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    ws = tmp_path / "ws"
    assert rlhf(ws, "base", "import", str(plain)) == 0
    assert rlhf(ws, "data", "import", "sft", str(DEMO_DATA / "support_sft.jsonl")) == 0
    capsys.readouterr()
    assert rlhf(ws, "sft", "train.max_steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoints/base:v1 has no chat template" in err and "--chat-template FILE" in err and "\n" not in err
    assert not (ws / "checkpoints" / "sft").exists() and not any((ws / ".scratch").glob("*"))

    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATE)
    assert rlhf(ws, "base", "import", str(plain), "--chat-template", str(template)) == 0
    assert ArtifactStore(ws).resolve("base:latest").manifest["metrics"]["has_chat_template"]
    assert rlhf(ws, "sft", "train.max_steps=1", "train.batch_size=2", "max_length=256") == 0
