"""The real default model (SmolLM2-135M-Instruct from the packaged GGUF) through the short pipeline."""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_DATA, rlhf
from rlhf import models
from rlhf.artifacts import ArtifactStore
from rlhf.sampling import complete

pytestmark = pytest.mark.integration


# What the base import asked of gguf: transformers reads the file for the config, the tokenizer
# and the weights, and builds a tensor-name map per module; `models.gguf_read_once` makes that one
# parse and one map (byte for byte the same checkpoint, in half the time).
IMPORT_CALLS: dict = {}


@pytest.fixture(scope="module")
def real_ws(tmp_path_factory):
    import gguf

    ws = tmp_path_factory.mktemp("real") / "ws"
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    IMPORT_CALLS.update(parses=0, maps=0)

    def counted_reader(*args, **kwargs):
        IMPORT_CALLS["parses"] += 1
        return reader(*args, **kwargs)

    def counted_map(*args):
        IMPORT_CALLS["maps"] += 1
        return name_map(*args)

    gguf.GGUFReader, gguf.get_tensor_name_map = counted_reader, counted_map
    try:
        assert rlhf(ws, "base", "import") == 0
        IMPORT_CALLS["restored"] = gguf.GGUFReader is counted_reader and gguf.get_tensor_name_map is counted_map
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    assert rlhf(ws, "data", "import", "sft", str(DEMO_DATA / "support_sft.jsonl")) == 0
    return ws


def test_base_import_converts_the_packaged_gguf(real_ws):
    store = ArtifactStore(real_ws)
    base = store.resolve("base:latest")
    m = base.manifest
    assert m["metrics"]["architecture"] == "LlamaForCausalLM"
    assert 130e6 < m["metrics"]["parameters"] < 140e6
    assert m["inputs"][0]["file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(m["files"])
    # Plain weights: the GGUF quantisation marker must not survive into the saved config.
    assert "quantization_config" not in json.loads((base.path / "config.json").read_text())
    assert store.verify("base:latest") == []
    assert IMPORT_CALLS == {"parses": 1, "maps": 1, "restored": True}


def test_sft_three_steps_makes_a_loadable_checkpoint_that_chats(real_ws, capsys):
    assert rlhf(real_ws, "sft", "train.max_steps=3", "train.batch_size=4", "max_length=256") == 0
    store = ArtifactStore(real_ws)
    sft = store.resolve("sft:latest", kind="checkpoint")
    m = sft.manifest
    assert {i["role"]: i["ref"] for i in m["inputs"]} == {"model": "checkpoints/base:v1", "data": "datasets/sft:v1"}
    assert all(i["content_hash"] == store.resolve(i["ref"]).content_hash for i in m["inputs"])
    metrics = m["metrics"]
    assert metrics["steps"] == 3
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_s"] > 0 and metrics["wall_s"] > 0
    assert metrics["peak_mem_mb"] > 500  # the 135M model alone is ~540 MB in fp32
    assert metrics["eval_loss"] < 10 and metrics["eval_loss_initial"] < 10  # a pretrained model, not random

    tokenizer = models.load_tokenizer(sft)
    model = models.load_causal_lm(store, sft)
    prompt = [{"role": "user", "content": "My package arrived damaged. What should I do?"}]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")
    [reply] = complete(model, tokenizer, [prompt], max_new_tokens=20)
    assert len(reply.split()) >= 3, reply  # real words from a pretrained chat model, not an empty string
    assert "lineage" not in capsys.readouterr().err


def test_quick_demo_runs_end_to_end_and_the_policy_traces_back_to_every_input(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert rlhf(ws, "demo", "--quick") == 0
    out = capsys.readouterr().out
    assert "stage timings:" in out and "held-out reward-model score" in out
    store = ArtifactStore(ws)
    lineage = store.lineage("checkpoints/ppo:latest")
    for parent in ("checkpoints/base:v1", "datasets/sft:v1", "checkpoints/sft:v1", "datasets/candidates:v1",
                   "datasets/rankings:v1", "datasets/preferences:v1", "checkpoints/reward:v1", ".gguf"):
        assert parent in lineage, parent
    # The compare report judges all three policies on the held-out prompts, by gold and reward model.
    report = store.resolve("reports/compare:latest")
    m = report.manifest["metrics"]
    assert m["models"] == {"sft": "checkpoints/sft:v1", "dpo": "checkpoints/dpo:v1", "ppo": "checkpoints/ppo:v1"}
    assert set(m["judges"]) == {"gold", "reward:checkpoints/reward:v1"} and m["n_prompts"] == 12
    assert len(m["judges"]["gold"]["leaderboard"]) == 3
    assert "leaderboard, judged by the gold scorer" in out and str(report.path / "report.html") in out
    # Running it again makes new versions and overwrites nothing; --methods adds RLOO and GRPO,
    # trained from the same SFT and reward model and compared with the others in one report.
    assert rlhf(ws, "demo", "--quick", "--methods", "dpo,ppo,rloo,grpo") == 0
    assert store.resolve("reports/compare:latest").version == 2 and store.resolve("ppo:latest").version == 2
    m = store.resolve("reports/compare:latest").manifest["metrics"]
    assert list(m["models"]) == ["sft", "dpo", "ppo", "rloo", "grpo"]
    assert len(m["judges"]["gold"]["leaderboard"]) == 5
    for method in ("rloo", "grpo"):
        roles = {i["role"]: i["ref"] for i in store.resolve(f"{method}:latest").manifest["inputs"]}
        assert roles["model"] == "checkpoints/sft:v2" and roles["reward"] == "checkpoints/reward:v2"


def test_reward_on_real_hh_rows_then_score_normalises_to_zero_mean(real_ws, tmp_path):
    from conftest import shared_data

    lines = shared_data("hh-rlhf-harmless/train.jsonl").read_text().splitlines()[:40]
    small = tmp_path / "hh40.jsonl"
    small.write_text("\n".join(lines) + "\n")
    assert rlhf(real_ws, "data", "import", "preferences", str(small), "--format", "hh", "--name", "hh") == 0
    assert rlhf(real_ws, "reward", "model=base:latest", "data=hh:latest", "train.max_steps=3", "train.batch_size=4",
                "max_length=256", "bootstrap_samples=200", "normalization_samples=1000") == 0
    store = ArtifactStore(real_ws)
    reward = store.resolve("reward:latest")
    m = reward.manifest["metrics"]
    assert m["steps"] == 3 and 0 <= m["eval_accuracy"] <= 1 and m["normalization"]["std"] > 0
    assert {i["role"]: i["ref"] for i in reward.manifest["inputs"]} == {"model": "checkpoints/base:v1",
                                                                         "data": "datasets/hh:v1"}
    assert rlhf(real_ws, "score", "reward=reward:latest", "data=hh:latest") == 0
    rows = [json.loads(line) for line in (store.resolve("hh:latest").path / "data.jsonl").read_text().splitlines()]
    scores = [r[k] for r in rows for k in ("chosen_score", "rejected_score")]
    # Normalised on the 36 training pairs; over all 40 pairs the mean is close to 0 and the spread close to 1.
    mean = sum(scores) / len(scores)
    assert abs(mean) < 0.25
    assert 0.5 < (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5 < 1.5


def _chat(store, ref):
    art = store.resolve(ref, kind="checkpoint")
    tokenizer, model = models.load_tokenizer(art), models.load_causal_lm(store, art)
    prompt = [{"role": "user", "content": "Can I return a rug I bought last week?"}]
    [reply] = complete(model, tokenizer, [prompt], max_new_tokens=16)
    return reply


def test_dpo_few_steps_on_real_pairs_makes_a_checkpoint_that_chats(real_ws):
    # Runs after the reward test above, which imported the HH rows as hh:v1.
    assert rlhf(real_ws, "dpo", "model=sft:latest", "data=hh:v1", "train.max_steps=2", "train.batch_size=2",
                "max_length=256", "kl_prompts=2", "max_new_tokens=8") == 0
    store = ArtifactStore(real_ws)
    m = store.resolve("dpo:latest").manifest["metrics"]
    assert m["steps"] == 2 and 0 <= m["eval_reward_accuracy"] <= 1 and m["eval_kl_to_reference"] is not None
    assert len(_chat(store, "dpo:latest").split()) >= 2


def test_ppo_few_iterations_with_the_real_reward_model_makes_a_checkpoint_that_chats(real_ws):
    assert rlhf(real_ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")) == 0
    assert rlhf(real_ws, "ppo", "model=sft:latest", "reward=reward:latest", "data=prompts:latest",
                "train.max_steps=2", "train.batch_size=4", "ppo.minibatch_size=2", "ppo.max_new_tokens=16",
                "eval_every=2", "eval_prompts=4") == 0
    store = ArtifactStore(real_ws)
    art = store.resolve("ppo:latest")
    m = art.manifest["metrics"]
    assert m["iterations"] == 2 and m["generation_tokens_per_s"] > 0 and m["update_tokens_per_s"] > 0
    assert m["eval_score_initial"] is not None and m["eval_kl"] is not None
    roles = {i["role"]: i["ref"] for i in art.manifest["inputs"]}
    assert roles["reward"] == "checkpoints/reward:v1" and roles["reference"] == roles["model"]
    assert len(_chat(store, "ppo:latest").split()) >= 2
    assert "sft:v1" in store.lineage("ppo:latest") and "reward:v1" in store.lineage("ppo:latest")
