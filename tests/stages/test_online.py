"""`rlhf rloo` and `rlhf grpo` (TRL's trainers on the suite's inputs) on a tiny random Llama.

A toy reward rises with finite KL; the CLI path scores with a real reward checkpoint and
records the lineage; bad input fails in one line before a model loads and leaves nothing.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import DEMO_DATA, favourite_token, rlhf
from rlhf.artifacts import ArtifactStore
from rlhf.config import GRPOConfig, RLOOConfig, load_config

STAGES = {"rloo": RLOOConfig, "grpo": GRPOConfig}


def main_of(stage: str):
    from grpo.train import main as grpo_main
    from rloo.train import main as rloo_main

    return {"rloo": rloo_main, "grpo": grpo_main}[stage]


@pytest.fixture
def prompts_ws(tiny_ws):
    assert rlhf(tiny_ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")) == 0
    return tiny_ws


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_toy_reward_rises_with_finite_kl(prompts_ws, stage):
    store = ArtifactStore(prompts_ws)
    prompts = [json.loads(line)["prompt"] for line in (DEMO_DATA / "support_prompts.jsonl").read_text().splitlines()]
    target = favourite_token(store, prompts[:32])

    def fraction_of_target(prompts, texts, completion_ids):
        return [sum(t == target for t in ids) / max(len(ids), 1) for ids in completion_ids]

    cfg = load_config(STAGES[stage], None, [
        "model=base:latest", "train.max_steps=16", "train.batch_size=4", "num_generations=4",
        "train.learning_rate=1e-2", "max_new_tokens=8", "temperature=1.0", "missing_eos_penalty=0",
        "eval_prompts=16", "beta=0.01"])
    art = main_of(stage)(cfg, store, score=fraction_of_target)
    m = art.manifest["metrics"]
    # The untrained policy hits the target in a few % of its tokens; +0.1 held out is learning.
    assert m["eval_reward"] > m["eval_reward_initial"] + 0.1, (m["eval_reward_initial"], m["eval_reward"])
    assert m["eval_kl_initial"] == pytest.approx(0, abs=1e-6)  # a new adapter starts as the reference
    assert math.isfinite(m["eval_kl"]) and m["eval_kl"] > 0
    log = [json.loads(line) for line in (art.path / "logs" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "reward" in e and "eval_reward" not in e]
    # Reward, KL and length are logged every step.
    assert [e["step"] for e in steps] == list(range(1, 17))
    assert all({"kl", "completions/mean_length", "entropy"} <= set(e) for e in steps)
    assert m["steps"] == 16 and m["train_tokens"] > 0 and m["mode"] == "lora"
    assert {i["role"] for i in art.manifest["inputs"]} == {"model", "reference", "data"}
    assert (art.path / "adapter_config.json").is_file()
    assert not any((prompts_ws / ".scratch").glob(f"{stage}-*"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_cli_scores_with_a_reward_checkpoint_and_its_policy_generates(pref_ws, stage, capsys):
    ws = pref_ws
    assert rlhf(ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")) == 0
    assert rlhf(ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl"), "--name", "dev") == 0
    assert rlhf(ws, "sft", "train.max_steps=2", "report.to=none") == 0
    assert rlhf(ws, "reward", "train.max_steps=2", "report.to=none") == 0
    capsys.readouterr()
    assert rlhf(ws, stage, "train.max_steps=2", "train.batch_size=2", "num_generations=2", "max_new_tokens=8",
                "eval_prompts=4", "report.to=none", "eval_gold=true", "eval_data=dev:latest") == 0
    out = capsys.readouterr().out
    assert f"wrote checkpoints/{stage}:v1" in out and out.strip().splitlines()[-1].startswith(f"{stage}: ")
    art = ArtifactStore(ws).resolve(f"{stage}:latest", kind="checkpoint")
    roles = {i["role"]: i["ref"] for i in art.manifest["inputs"]}
    assert roles["reward"] == "checkpoints/reward:v1" and roles["model"] == "checkpoints/sft:v1"
    assert roles["data"] == "datasets/prompts:v1" and roles["eval_data"] == "datasets/dev:v1"
    # The normalised reward-model score is what was optimised and measured; the gold scorer rode
    # along at weight 0, logged every step and held out.
    m = art.manifest["metrics"]
    assert all(isinstance(m[k], float) for k in ("eval_reward", "eval_gold_initial", "eval_gold"))
    log = [json.loads(line) for line in (art.path / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all("rewards/gold/mean" in e for e in log if "reward" in e and "eval_reward" not in e)
    assert rlhf(ws, "generate", f"model={stage}:latest", "data=prompts:latest", "k=1", "limit=2",
                "sampling.max_new_tokens=4", f"output=from-{stage}") == 0
    assert rlhf(ws, "artifacts", "verify", f"{stage}:latest") == 0
    # A sweep over the KL coefficient, ranked by the held-out reward; beta=0 drops the KL term.
    assert rlhf(ws, "sweep", stage, "beta=0,0.1", "train.max_steps=1", "train.batch_size=2", "num_generations=2",
                "max_new_tokens=4", "eval_prompts=2", "report.to=none", "--metric", "eval_reward") == 0
    sweep = ArtifactStore(ws).resolve("reports/sweep:latest")
    trials = [ArtifactStore(ws).resolve(i["ref"]) for i in sweep.manifest["inputs"] if i["role"] == "trial"]
    assert sweep.manifest["metrics"]["trials"] == 2 and [t.manifest["config"]["beta"] for t in trials] == [0, 0.1]
    kls = [t.manifest["metrics"]["eval_kl"] for t in trials]
    assert kls[0] is None and isinstance(kls[1], float)


@pytest.fixture(scope="module")
def reward_ws(tmp_path_factory, tiny_model_dir):
    """The tiny base, the demo prompts and a reward model trained for 2 steps on marker preferences."""
    from conftest import write_marker_preferences

    tmp = tmp_path_factory.mktemp("online")
    ws = tmp / "ws"
    assert rlhf(ws, "base", "import", str(tiny_model_dir)) == 0
    assert rlhf(ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")) == 0
    assert rlhf(ws, "data", "import", "preferences", str(write_marker_preferences(tmp / "p.jsonl"))) == 0
    assert rlhf(ws, "reward", "model=base:latest", "train.max_steps=2", "report.to=none") == 0
    return ws


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("overrides, says", [
    (["reward=base:latest"], "not a reward model"),
    (["model=reward:latest"], "is a reward model"),
    (["model=prompts:latest"], "dataset"),
    (["data=prompts:v9"], "no version v9 of datasets/prompts"),
    (["eval_data=preferences:latest"], "'preferences' dataset"),
    (["trl.beta=0.1"], "set beta=... instead"),
    (["trl.max_completion_length=9"], "set max_new_tokens=... instead"),
    (["trl.per_device_train_batch_size=9"], "set train.batch_size=... instead"),
    (["trl.no_such_key=1"], "unknown key 'trl.no_such_key'"),
    (["max_prompt_length=8"], "raise max_prompt_length"),
    (["num_generations=1"], "num_generations"),
    (["output=bad/name"], "output"),
    (["report.to=wandb"], "pip install wandb"),
])
def test_bad_input_fails_in_one_line_before_loading_and_leaves_nothing(reward_ws, stage, overrides, says, capsys,
                                                                        monkeypatch):
    from rlhf import models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_causal_lm", no_loading)
    capsys.readouterr()
    code = rlhf(reward_ws, stage, "model=base:latest", *overrides)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert says in err and "\n" not in err, err
    assert not (reward_ws / "checkpoints" / stage).exists()
    assert not any((reward_ws / ".scratch").glob(f"{stage}-*"))


def test_compare_reports_each_policys_kl_to_its_reference(prompts_ws):
    """A policy that did not move is at KL 0 from its reference; one that learned is not; SFT-like
    checkpoints without a reference have none."""
    store = ArtifactStore(prompts_ws)
    prompts = [json.loads(line)["prompt"] for line in (DEMO_DATA / "support_prompts.jsonl").read_text().splitlines()]
    target = favourite_token(store, prompts[:32])

    def fraction_of_target(prompts, texts, completion_ids):
        return [sum(t == target for t in ids) / max(len(ids), 1) for ids in completion_ids]

    common = ["model=base:latest", "train.max_steps=8", "train.batch_size=4", "max_new_tokens=8", "temperature=1.0",
              "missing_eos_penalty=0", "eval_prompts=4", "report.to=none"]
    for output, lr in (("still", "1e-12"), ("moved", "1e-2")):
        main_of("grpo")(load_config(GRPOConfig, None, [*common, f"output={output}", f"train.learning_rate={lr}"]),
                        store, score=fraction_of_target)
    assert rlhf(prompts_ws, "compare", "checkpoints/base:v1", "still:latest", "moved:latest", "data=prompts:latest",
                "judge=gold", "limit=16", "sampling.temperature=1.0", "sampling.max_new_tokens=8",
                "bootstrap_samples=100") == 0
    report = store.resolve("reports/compare:latest")
    kl = report.manifest["metrics"]["kl_to_reference"]
    assert kl["base"] is None
    assert kl["still"] == pytest.approx(0, abs=1e-6)  # the same weights: every log-ratio is 0
    # The learned policy samples its favourite token far more often than the reference would.
    assert kl["moved"] > 0.5, kl
    assert "| moved | " in (report.path / "summary.md").read_text()
