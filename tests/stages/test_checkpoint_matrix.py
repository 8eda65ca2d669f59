"""Every stage from every kind of input checkpoint: base, LoRA SFT, merged SFT, full SFT,
freeze SFT, and an SFT trained on top of a LoRA SFT.

The review's crash (`rlhf reward model=sft:latest` on the default LoRA SFT) came from a path
only this matrix walks. Each test asserts what the input kind must not change: a LoRA SFT and
the same SFT saved merged are the same weights, so every stage must treat them alike.
"""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_DATA, rlhf, write_marker_preferences
from rlhf.artifacts import ArtifactStore

SFT = ["train.max_steps=2", "train.batch_size=4", "max_length=128", "train.learning_rate=5e-3", "train.seed=3"]
KINDS = {
    "base": ("base:latest", "full weights"),
    "lora": ("sft-lora:latest", "adapter checkpoints/sft-lora:v1 merged into checkpoints/base:v1"),
    "merged": ("sft-merged:latest", "full weights"),
    "full": ("sft-full:latest", "full weights"),
    "freeze": ("sft-freeze:latest", "full weights"),
    "sft_of_lora": ("sft-sft:latest",
                    "adapter checkpoints/sft-lora:v1 + checkpoints/sft-sft:v1 merged into checkpoints/base:v1"),
}
REWARD = ["train.max_steps=2", "train.batch_size=4", "max_length=192", "bootstrap_samples=100",
          "normalization_samples=16", "train.seed=5"]
DPO = ["train.max_steps=2", "train.batch_size=4", "max_length=192", "kl_prompts=2", "max_new_tokens=4"]
PPO = ["train.max_steps=1", "train.batch_size=4", "ppo.minibatch_size=2", "ppo.max_new_tokens=6", "eval_every=100",
       "eval_prompts=2", "data=heldout:latest", "reward=reward:latest",
       "ppo.value_init=reward"]  # the reward model's head onto every kind of policy, not just the default's zeros
ONLINE = ["train.max_steps=1", "train.batch_size=2", "num_generations=2", "max_new_tokens=6", "eval_prompts=2",
          "data=heldout:latest", "reward=reward:latest", "report.to=none"]
GREEDY = ["data=heldout:latest", "k=1", "limit=3", "sampling.temperature=0", "sampling.max_new_tokens=8"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    """One workspace with an input checkpoint of every kind, preferences, held-out prompts and a reward model."""
    ws = tmp_path_factory.mktemp("matrix") / "ws"
    prefs = write_marker_preferences(ws.parent / "p.jsonl", n=40)
    assert rlhf(ws, "base", "import", str(tiny_model_dir)) == 0
    assert rlhf(ws, "data", "import", "sft", str(DEMO_DATA / "support_sft.jsonl")) == 0
    assert rlhf(ws, "data", "import", "preferences", str(prefs)) == 0
    assert rlhf(ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts_heldout.jsonl"),
                "--name", "heldout") == 0
    assert rlhf(ws, "sft", *SFT, "output=sft-lora") == 0
    assert rlhf(ws, "sft", *SFT, "merge=true", "output=sft-merged") == 0
    assert rlhf(ws, "sft", *SFT, "mode=full", "output=sft-full") == 0
    assert rlhf(ws, "sft", *SFT, "mode=freeze", "freeze.trainable_layers=1", "output=sft-freeze") == 0
    assert rlhf(ws, "sft", *SFT, "model=sft-lora:latest", "output=sft-sft") == 0
    assert rlhf(ws, "reward", "model=base:latest", *REWARD) == 0
    return ws


def model_input(art) -> dict:
    return next(i for i in art.manifest["inputs"] if i["role"] == "model")


def run_from(ws, stage: str, kind: str, *args: str):
    """`rlhf <stage> model=<the kind's checkpoint>` into `<stage>-<kind>`; its manifest says how it loaded."""
    ref, loaded_as = KINDS[kind]
    out = f"{stage}-{kind}"
    assert rlhf(ws, stage, f"model={ref}", *args, f"output={out}") == 0
    art = ArtifactStore(ws).resolve(f"{out}:latest")
    assert model_input(art)["loaded_as"] == loaded_as
    return art


def test_sft_records_how_it_loaded_each_input(ws):
    store = ArtifactStore(ws)
    assert model_input(store.resolve("sft-sft:latest"))["loaded_as"] == KINDS["lora"][1]
    assert "(adapter checkpoints/sft-lora:v1 merged into" in store.lineage("sft-sft:latest")


@pytest.mark.parametrize("kind", list(KINDS))
def test_reward_from_every_kind_of_checkpoint(ws, kind):
    art = run_from(ws, "reward", kind, *REWARD)
    # Saved as one standalone classifier whatever the input, so scoring needs no adapter chain.
    assert not (art.path / "adapter_config.json").exists()
    assert rlhf(ws, "score", f"reward={art.ref}", "data=preferences:latest", f"output=scored-{kind}") == 0


def test_a_reward_model_starts_from_the_merged_weights_of_a_lora_sft(ws):
    """The classifier's backbone is the LoRA SFT merged (equal to the merged SFT), not the base."""
    import torch

    from rlhf import models

    store = ArtifactStore(ws)
    backbone = lambda ref: models.load_sequence_classifier(store, store.resolve(ref, kind="checkpoint")).model
    from_lora, from_merged, from_base = (backbone(r).state_dict() for r in
                                         ("sft-lora:latest", "sft-merged:latest", "base:latest"))
    assert from_lora.keys() == from_merged.keys()
    for key in from_lora:
        torch.testing.assert_close(from_lora[key], from_merged[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(from_lora[k], from_base[k]) for k in from_lora)


def test_scores_from_lora_and_merged_sft_reward_models_agree(ws):
    """Same SFT weights, same seed, same pairs: the two reward models score every response alike."""
    rows = {kind: [json.loads(line) for line in
                   (ArtifactStore(ws).resolve(f"scored-{kind}:latest").path / "data.jsonl").read_text().splitlines()]
            for kind in ("lora", "merged")}
    assert len(rows["lora"]) == 40
    for a, b in zip(rows["lora"], rows["merged"]):
        assert a["chosen_score"] == pytest.approx(b["chosen_score"], abs=1e-3)
        assert a["rejected_score"] == pytest.approx(b["rejected_score"], abs=1e-3)


@pytest.mark.parametrize("kind", list(KINDS))
def test_dpo_from_every_kind_of_checkpoint_uses_it_as_the_reference(ws, kind):
    art = run_from(ws, "dpo", kind, *DPO)
    m = art.manifest["metrics"]
    # Before training the policy is the reference, so the implicit reward margin is 0; a
    # reference taken from anything else (the base under a LoRA SFT) would give a margin.
    assert abs(m["eval_reward_margin_initial"]) < 1e-3
    assert m["eval_kl_to_reference"] is not None
    # The DPO adapter stacks on its input: generating from it follows the whole chain.
    assert rlhf(ws, "generate", f"model={art.ref}", *GREEDY, f"output=cand-dpo-{kind}") == 0


@pytest.mark.parametrize("kind", list(KINDS))
def test_ppo_from_every_kind_of_checkpoint_starts_at_its_reference(ws, kind):
    art = run_from(ws, "ppo", kind, *PPO)
    history = [json.loads(line) for line in (art.path / "logs" / "ppo_log.jsonl").read_text().splitlines()]
    # The first rollout is sampled before any update: policy = reference, so the KL is 0.
    assert abs(history[0]["kl"]) < 1e-4
    assert rlhf(ws, "generate", f"model={art.ref}", *GREEDY, f"output=cand-ppo-{kind}") == 0


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_rloo_and_grpo_from_every_kind_of_checkpoint_start_at_their_reference(ws, kind, stage):
    art = run_from(ws, stage, kind, *ONLINE)
    # The held-out evaluation before training samples from the policy = the reference: KL 0.
    assert abs(art.manifest["metrics"]["eval_kl_initial"]) < 1e-4
    assert rlhf(ws, "generate", f"model={art.ref}", *GREEDY, f"output=cand-{stage}-{kind}") == 0


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_from_every_kind_of_checkpoint(ws, kind):
    run_from(ws, "generate", kind, *GREEDY)


def test_lora_and_merged_sft_generate_and_compare_alike(ws):
    store = ArtifactStore(ws)
    for kind in ("lora", "merged"):
        if not (ws / "datasets" / f"generate-{kind}").exists():
            run_from(ws, "generate", kind, *GREEDY)
    text = {kind: [r["responses"][0]["text"] for r in map(
                json.loads, (store.resolve(f"generate-{kind}:latest").path / "data.jsonl").read_text().splitlines())]
            for kind in ("lora", "merged")}
    assert text["lora"] == text["merged"] and len(text["lora"]) == 3
    # Greedy answers from the same weights: every battle is a tie under both judges.
    assert rlhf(ws, "compare", "sft-lora:latest", "sft-merged:latest", "data=heldout:latest", "limit=4",
                "sampling.temperature=0", "sampling.max_new_tokens=8", "bootstrap_samples=100",
                "judge=gold,reward:latest") == 0
    judges = json.loads((store.resolve("compare:latest").path / "metrics.json").read_text())["judges"]
    for judge in judges.values():
        pair = judge["pairs"][0]
        assert (pair["ties"], pair["n"]) == (4, 4), judge
