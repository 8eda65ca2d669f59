"""Where the suite meets the engineers' other tools: TensorBoard curves inside each artifact,
`rlhf export` for serving, adapters that survive a moved workspace, and discoverable configs."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
import yaml

from conftest import DEMO_DATA, rlhf, tensorboard_scalars
from rlhf.artifacts import ArtifactStore
from rlhf.config import PPOConfig, load_config

SFT = ["sft", "model=base:latest", "train.max_steps=4", "train.batch_size=4", "max_length=128",
       "train.logging_steps=1", "train.learning_rate=5e-3"]
COMPARE = ["data=heldout:latest", "limit=4", "sampling.max_new_tokens=8", "bootstrap_samples=100"]


def lines(path) -> list[str]:
    return path.read_text().splitlines()


def logged_losses(art) -> dict[int, float]:
    entries = [json.loads(line) for line in (art.path / "logs" / "train_log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def test_training_curves_reach_tensorboard_inside_the_artifact(tiny_ws, capsys):
    assert rlhf(tiny_ws, *SFT) == 0
    art = ArtifactStore(tiny_ws).resolve("sft:latest", kind="checkpoint")
    # The last thing printed is the suite's own summary, not the trainer's dict of strings.
    m = art.manifest["metrics"]
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"sft: eval_loss {m['eval_loss_initial']:.4g} → {m['eval_loss']:.4g}, ")
    curves = tensorboard_scalars(art.path / "logs" / "tensorboard")
    losses = logged_losses(art)
    assert sorted(curves["train/loss"]) == sorted(losses) == [1, 2, 3, 4]
    assert all(curves["train/loss"][s] == pytest.approx(v, rel=1e-4) for s, v in losses.items())
    # The evaluation after training is flushed too, not lost in a writer left open.
    assert curves["eval/loss"][4] == pytest.approx(art.manifest["metrics"]["eval_loss"], rel=1e-4)
    assert not list((tiny_ws / ".scratch").glob("*")), "scratch removed after success"

    assert rlhf(tiny_ws, *SFT, "report.to=none") == 0
    art = ArtifactStore(tiny_ws).resolve("sft:latest", kind="checkpoint")
    assert art.version == 2 and not (art.path / "logs" / "tensorboard").exists()
    assert logged_losses(art), "the JSONL log the dashboard reads is written whatever report.to says"


def test_tracker_settings_that_cannot_work_fail_before_any_model_loads(tiny_ws, capsys):
    assert rlhf(tiny_ws, *SFT, "trl.report_to=tensorboard") == 2
    assert "trl.report_to is set by the suite itself" in capsys.readouterr().err
    assert rlhf(tiny_ws, *SFT, "report.to=tensorboard,none") == 2
    assert "give none alone" in capsys.readouterr().err
    if importlib.util.find_spec("wandb") is None:
        assert rlhf(tiny_ws, *SFT, "report.to=wandb") == 2
        assert "pip install wandb" in capsys.readouterr().err
    if importlib.util.find_spec("mlflow") is None:  # PPO checks its trackers too, before anything loads
        assert rlhf(tiny_ws, "ppo", "model=base:latest", "report.to=mlflow") == 2
        assert "pip install mlflow" in capsys.readouterr().err
    assert not (tiny_ws / "checkpoints" / "sft").exists() and not list((tiny_ws / ".scratch").glob("*"))


def greedy(model, tokenizer, prompts) -> list[list[int]]:
    from rlhf.sampling import encode_prompts, sample

    ids, mask, _ = encode_prompts(tokenizer, prompts, 256)
    return sample(model, tokenizer, ids, mask, max_new_tokens=12, temperature=0.0).response_ids.tolist()


def test_export_writes_a_checkpoint_plain_transformers_serves_with_the_suites_tokens(tiny_ws, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf import models

    assert rlhf(tiny_ws, *SFT) == 0  # a LoRA adapter on base
    assert rlhf(tiny_ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts_heldout.jsonl"),
                "--name", "heldout") == 0
    assert rlhf(tiny_ws, "compare", "sft:latest", "base:latest", "judge=gold", *COMPARE) == 0
    out = tmp_path / "served" / "sft"
    out.parent.mkdir()
    assert rlhf(tiny_ws, "export", "sft:latest", str(out), "--dtype", "fp32") == 0

    store = ArtifactStore(tiny_ws)
    art = store.resolve("sft:latest", kind="checkpoint")
    prompts = [json.loads(line)["prompt"] for line in lines(DEMO_DATA / "support_prompts.jsonl")[:4]]
    tokenizer = models.load_tokenizer(art)
    ours = greedy(models.load_causal_lm(store, art), tokenizer, prompts)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert greedy(plain, AutoTokenizer.from_pretrained(out), prompts) == ours
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and not (out / "adapter_config.json").exists()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "text-generation" and "sft" in meta["tags"]
    assert "checkpoints/base:v1" in card and "lora" in card  # the lineage and the config
    [row] = [line for line in card.splitlines() if line.startswith("| reports/compare:v1 | gold | base")]
    report = store.resolve("compare:latest").manifest["metrics"]["judges"]["gold"]["pairs"][0]
    mine = report["win_rate"] if report["a"] == "sft" else 1 - report["win_rate"]
    assert f"| {mine:.3f} |" in row

    half = tmp_path / "served" / "sft-bf16"
    assert rlhf(tiny_ws, "export", "sft:latest", str(half)) == 0  # bf16 by default
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16
    assert sorted(p.name for p in (tmp_path / "served").iterdir()) == ["sft", "sft-bf16"]  # no temporaries left


def test_a_reward_model_exports_as_a_classifier_with_its_normalisation(pref_ws, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.judges import RewardModel, raw_rewards

    assert rlhf(pref_ws, "reward", "model=base:latest", "train.max_steps=2", "max_length=256",
                "bootstrap_samples=100", "normalization_samples=32") == 0
    assert "reward: scoring 20 held-out pairs and 32 training responses: done in" in capsys.readouterr().err
    assert rlhf(pref_ws, "export", "reward:latest", str(tmp_path / "rm"), "--dtype", "fp32") == 0
    suite = RewardModel(ArtifactStore(pref_ws), "reward:latest")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["reward_normalization"] == {"mean": suite.mean, "std": suite.std}
    conversations = [json.loads(line)["messages"] for line in lines(DEMO_DATA / "support_sft.jsonl")[:4]]
    plain = raw_rewards(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm"),
                        AutoTokenizer.from_pretrained(tmp_path / "rm"), conversations)
    assert plain == pytest.approx(raw_rewards(suite.model, suite.tokenizer, conversations), abs=1e-4)
    card = (tmp_path / "rm" / "README.md").read_text()
    assert "text-classification" in card and f"{suite.std:.6g}" in card


def test_export_refuses_a_bad_target_before_loading_and_leaves_nothing(tiny_ws, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert rlhf(tiny_ws, "export", "base:latest", str(taken)) == 2
    assert "not an empty directory" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"
    assert rlhf(tiny_ws, "export", "base:latest", str(tmp_path / "no" / "such" / "dir")) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    assert rlhf(tiny_ws, "export", "nope:latest", str(tmp_path / "out")) == 2
    assert "no artifact named 'nope'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "ws"]


def test_a_moved_workspace_still_generates_and_compares(tiny_ws, tmp_path):
    assert rlhf(tiny_ws, *SFT) == 0
    sft = ArtifactStore(tiny_ws).resolve("sft:latest", kind="checkpoint")
    adapter = json.loads((sft.path / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "../../base/v0001"  # relative to the adapter, not absolute
    base = ArtifactStore(tiny_ws).resolve("base", kind="checkpoint")
    assert (sft.path / adapter["base_model_name_or_path"]).resolve() == base.path

    moved = tmp_path / "elsewhere" / "ws"
    shutil.move(str(tiny_ws), moved)
    assert rlhf(moved, "artifacts", "verify", "checkpoints/sft:latest") == 0
    assert rlhf(moved, "data", "import", "prompts", str(DEMO_DATA / "support_prompts_heldout.jsonl"),
                "--name", "heldout") == 0
    assert rlhf(moved, "generate", "model=sft:latest", "data=heldout:latest", "k=2", "limit=3",
                "sampling.max_new_tokens=8") == 0
    assert rlhf(moved, "compare", "sft:latest", "base:latest", "judge=gold", *COMPARE) == 0
    assert ArtifactStore(moved).resolve("compare:latest").path.is_relative_to(moved)


def test_help_lists_every_config_key_and_config_show_prints_what_a_stage_would_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any directory
    with pytest.raises(SystemExit) as exit_:
        rlhf(tmp_path, "ppo", "--help")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "train.max_steps" in out and "ppo.kl_coef" in out and "report.to" in out
    shipped = next(w for w in out.split() if w.endswith("configs/ppo.yaml;"))
    assert shipped.startswith("/") and (tmp_path / shipped.rstrip(";")).is_file()
    [line] = [line for line in out.splitlines() if line.strip().startswith("train.max_steps")]
    assert " 20 " in line  # PPO's own default, not TrainConfig's -1

    assert rlhf(tmp_path, "config", "show", "ppo", "--config", "configs/ppo.yaml", "ppo.kl_coef=0.2") == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["ppo"]["kl_coef"] == 0.2
    # What it prints is the whole resolved config: it loads back to the same config.
    assert PPOConfig.model_validate(shown) == load_config(
        PPOConfig, "configs/ppo.yaml", ["ppo.kl_coef=0.2"])
    assert rlhf(tmp_path, "config", "show", "ppo", "ppo.kl_coeff=0.2") == 2
    assert "did you mean 'ppo.kl_coef'" in capsys.readouterr().err
