"""`rlhf reward` and `rlhf score` on a tiny random Llama with a synthetic, learnable preference."""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_DATA, rlhf, write_marker_preferences
from rlhf.artifacts import ArtifactStore


def test_reward_model_learns_the_marker_and_reports_held_out_metrics(pref_ws, tmp_path):
    import torch

    from reward.loss import expected_calibration_error, fit_temperature, preference_probability
    from rlhf.data import load_rows, split_pairs
    from rlhf.judges import RewardModel

    # A dev set of fresh marker pairs, scored as eval_data besides the seeded split.
    assert rlhf(pref_ws, "data", "import", "preferences", str(write_marker_preferences(tmp_path / "dev.jsonl", 60, 7)),
                "--name", "dev") == 0
    # normalization_samples above the 320 training responses: the normalisation uses them all.
    assert rlhf(pref_ws, "reward", "model=base:latest", "train.max_steps=60", "train.learning_rate=3e-3",
                "train.eval_fraction=0.2", "max_length=256", "bootstrap_samples=200", "normalization_samples=400",
                "eval_data=dev:latest") == 0
    store = ArtifactStore(pref_ws)
    art = store.resolve("reward:latest")
    m = art.manifest["metrics"]
    assert m["eval_pairs"] == 40
    assert m["eval_accuracy"] >= 0.9
    lo, hi = m["eval_accuracy_ci95"]
    assert lo <= m["eval_accuracy"] <= hi and hi - lo < 0.3
    # Re-score the same split with the published model, as `rlhf score` and PPO will.
    prefs = store.resolve("preferences:latest")
    split = split_pairs(prefs, load_rows(prefs), 0.2, 42, ["prompt", "chosen", "rejected"], stage="the test")
    reward = RewardModel(store, art.ref)
    score = lambda rows, side: torch.tensor(reward.score([r["prompt"] for r in rows],
                                                         [r[side][0]["content"] for r in rows]))
    train = list(split["train"])
    normalised = torch.cat([score(train, "chosen"), score(train, "rejected")])
    # The stored normalisation is the mean and std of the training responses' rewards.
    assert abs(normalised.mean()) < 0.01 and abs(normalised.std() - 1) < 0.01
    test = list(split["test"])
    raw = lambda side: score(test, side) * reward.std + reward.mean
    ece = expected_calibration_error(preference_probability(raw("chosen"), raw("rejected")))
    assert float(ece) == pytest.approx(m["eval_ece"], abs=1e-3)
    # The stored temperature is fitted to every held-out pair, the split's 40 and the dev set's 60,
    # and scoring uses it.
    dev_rows = load_rows(store.resolve("dev:latest"))
    dev_raw = lambda side: score(dev_rows, side) * reward.std + reward.mean
    held_out = torch.cat([raw("chosen") - raw("rejected"), dev_raw("chosen") - dev_raw("rejected")])
    temperature = m["calibration"]["temperature"]
    assert temperature == pytest.approx(fit_temperature(held_out), rel=1e-3)
    assert m["calibration"]["fitted_on_pairs"] == 100 and reward.temperature == temperature
    # Cross-fitted: alternate pairs are scaled with the temperature of the other half, never their own.
    even = torch.arange(100) % 2 == 0
    scaled = torch.where(even, held_out / fit_temperature(held_out[~even]), held_out / fit_temperature(held_out[even]))
    cross_fitted_ece = lambda part: float(expected_calibration_error(torch.sigmoid(part)))
    assert m["eval_ece_calibrated"] == pytest.approx(cross_fitted_ece(scaled[:40]), abs=1e-3)
    assert m["eval_data"]["ece_calibrated"] == pytest.approx(cross_fitted_ece(scaled[40:]), abs=1e-3)
    # The dev set: 60 pairs the model never saw, scored like the split.
    dev = m["eval_data"]
    assert dev["ref"] == "datasets/dev:v1" and dev["pairs"] == 60 and dev["pairs_longer_than_max_length"] == 0
    assert dev["accuracy"] >= 0.9 and dev["accuracy_ci95"][0] <= dev["accuracy"] <= dev["accuracy_ci95"][1]
    assert 0 <= dev["ece_calibrated"] <= 1 and 0 <= dev["ece"] <= 1
    assert (art.path / "report" / "margin_hist.png").stat().st_size > 1000
    summary = (art.path / "report" / "summary.md").read_text()
    assert "pairwise accuracy" in summary and "datasets/dev:v1 (60 pairs)" in summary
    assert {i["role"] for i in art.manifest["inputs"]} == {"model", "data", "eval_data"}


def test_score_normalises_so_training_responses_average_zero_and_marker_scores_higher(pref_ws, monkeypatch):
    from rlhf import training

    checks = []
    real = training.padding_free_decision
    monkeypatch.setattr(training, "padding_free_decision", lambda *a: checks.append(real(*a)) or checks[-1])
    assert rlhf(pref_ws, "reward", "model=base:latest", "train.max_steps=60", "train.learning_rate=3e-3",
                "train.eval_fraction=0.2", "max_length=256", "bootstrap_samples=200",
                "normalization_samples=400") == 0
    # One load check for training, one for all of the evaluation's scorings.
    assert [c["enabled"] for c in checks] == [True, True]
    checks.clear()
    assert rlhf(pref_ws, "score", "reward=reward:latest", "data=preferences:latest") == 0
    # Two scorings (chosen, rejected) packed, on one load check of the reward model.
    assert [c["enabled"] for c in checks] == [True]
    store = ArtifactStore(pref_ws)
    scored = store.resolve("datasets/preferences:latest")
    assert scored.version == 2 and {i["role"] for i in scored.manifest["inputs"]} == {"data", "reward"}
    rows = [json.loads(line) for line in (scored.path / "data.jsonl").read_text().splitlines()]
    scores = [r[k] for r in rows for k in ("chosen_score", "rejected_score")]
    # The normalisation was estimated on the 320 training pairs (all 640 responses sampled
    # down to 400); over all 200 pairs the normalised mean sits near 0.
    assert abs(sum(scores) / len(scores)) < 0.3
    assert sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows) >= 0.9
    # Each pair's calibrated P(chosen ≻ rejected) agrees with the order of its two scores.
    assert all((r["p_chosen"] > 0.5) == (r["chosen_score"] > r["rejected_score"]) and 0 <= r["p_chosen"] <= 1
               for r in rows)


def test_bad_reward_inputs_fail_clearly(pref_ws, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text((tmp_path / "p.jsonl").read_text().splitlines()[0] + "\n")
    assert rlhf(pref_ws, "data", "import", "preferences", str(one), "--name", "tiny") == 0
    assert rlhf(pref_ws, "reward", "model=base:latest", "data=tiny:latest") == 2
    assert "needs at least 2 pairs" in capsys.readouterr().err
    # An SFT dataset is not a preference dataset.
    assert rlhf(pref_ws, "reward", "model=base:latest", "data=sft:latest") == 2
    assert "needs a 'preferences' dataset" in capsys.readouterr().err
    # Scoring with something that is not a reward model is refused.
    assert rlhf(pref_ws, "score", "reward=base:latest", "data=preferences:latest") == 2
    assert "not a reward model" in capsys.readouterr().err
    # A held-out set that is also training data, or not a preference set, is refused before any model loads.
    assert rlhf(pref_ws, "reward", "model=base:latest", "eval_data=preferences:v1") == 2
    assert "eval_data=preferences:v1 is datasets/preferences:v1, which is also training data" in \
        capsys.readouterr().err
    assert rlhf(pref_ws, "reward", "model=base:latest", "eval_data=sft:latest") == 2
    assert "needs a 'preferences' dataset" in capsys.readouterr().err
    assert rlhf(pref_ws, "reward", "model=base:latest", "eval_data=nothing:latest") == 2
    assert "nothing" in capsys.readouterr().err
    assert rlhf(pref_ws, "reward", "model=base:latest", "truncation=right") == 2
    err = capsys.readouterr().err.strip()
    assert "truncation" in err and "'left' or 'drop'" in err and "\n" not in err
    assert not (pref_ws / "checkpoints" / "reward").exists()


def test_reward_early_stopping_watches_the_held_out_pairwise_loss(pref_ws):
    # A threshold no step can beat: the second evaluation does not count as better, so with
    # patience 1 training stops there, and the better of the two evaluated checkpoints is kept.
    assert rlhf(pref_ws, "reward", "model=base:latest", "train.max_steps=60", "train.learning_rate=3e-3",
                "train.eval_fraction=0.2", "max_length=256", "bootstrap_samples=100", "normalization_samples=16",
                "train.eval_steps=5", "train.early_stopping_patience=1", "train.early_stopping_threshold=10") == 0
    art = ArtifactStore(pref_ws).resolve("reward:latest")
    m = art.manifest["metrics"]
    assert m["stopped_at_step"] == m["steps"] == 10
    assert m["stop_reason"] == ("early stopping: eval_loss did not improve by more than 10.0 "
                                "for 1 evaluation(s) in a row")
    log = [json.loads(line) for line in (art.path / "logs" / "train_log.jsonl").read_text().splitlines()]
    evals = {e["step"]: e["eval_loss"] for e in log if "eval_loss" in e}
    assert sorted(evals) == [5, 10]
    assert m["best_step"] == min(evals, key=evals.get) and m["best_eval_loss"] == min(evals.values())
    assert m["restored_best_checkpoint"] is True


def test_packed_batches_train_as_padded_ones_do(pref_ws):
    # In fp32, a run whose batches are packed into shared rows takes the same steps as a padded run.
    runs = {}
    for packed in ("true", "false"):
        assert rlhf(pref_ws, "reward", "model=base:latest", "train.max_steps=6", "train.learning_rate=3e-3",
                    "train.logging_steps=1", "train.precision=fp32", "max_length=256", f"padding_free={packed}",
                    f"output=r-{packed}", "bootstrap_samples=100", "normalization_samples=16") == 0
        art = ArtifactStore(pref_ws).resolve(f"r-{packed}:latest")
        log = [json.loads(line) for line in (art.path / "logs" / "train_log.jsonl").read_text().splitlines()]
        runs[packed] = art.manifest["metrics"], [e["loss"] for e in log if "loss" in e]
    (packed, packed_losses), (padded, padded_losses) = runs["true"], runs["false"]
    assert packed["padding_free"] == {"enabled": True, "reason": "packed sequences match their unpacked selves",
                                      "attention": "by sequence"}
    assert padded["padding_free"] == {"enabled": False, "reason": "padding_free=false"}
    assert len(packed_losses) == 6 and packed_losses == pytest.approx(padded_losses, rel=1e-4)
    assert packed_losses[-1] < packed_losses[0]
    assert packed["train_tokens"] == padded["train_tokens"]
    # The final scoring runs in bf16 where the CPU has it, which rounds the two alike models apart a little.
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-2)


def test_over_long_pairs_are_cut_from_the_left_or_dropped(pref_ws, capsys):
    # The marker pairs have 139-300 tokens. At 100 every one is too long: cut from the left, each
    # keeps its final reply and with it the marker the model must learn; dropped, nothing is left.
    common = ["model=base:latest", "train.learning_rate=3e-3", "bootstrap_samples=100", "normalization_samples=16"]
    assert rlhf(pref_ws, "reward", *common, "max_length=100", "train.max_steps=60", "output=left") == 0
    capsys.readouterr()
    assert rlhf(pref_ws, "reward", *common, "max_length=100", "truncation=drop") == 2
    err = capsys.readouterr().err.strip()
    assert "all 180 training pairs of datasets/preferences:v1 are longer than max_length=100" in err
    assert "truncation=left" in err and "\n" not in err
    assert rlhf(pref_ws, "reward", *common, "max_length=170", "train.max_steps=2", "truncation=drop",
                "output=drop") == 0
    store = ArtifactStore(pref_ws)
    left, drop = (store.resolve(f"{name}:latest").manifest["metrics"] for name in ("left", "drop"))
    assert left["train_pairs"] == left["train_pairs_too_long"] == 180 and left["eval_accuracy"] >= 0.9
    assert 0 < drop["train_pairs_too_long"] < 180 and drop["train_pairs"] == 180 - drop["train_pairs_too_long"]
    assert not (pref_ws / "checkpoints" / "reward").exists()


def test_a_model_that_lets_packed_sequences_see_each_other_trains_padded(pref_ws, monkeypatch,
                                                                         attention_drops_packed_lengths):
    import transformers.masking_utils

    # As an architecture that builds a plain causal mask whatever the position ids say, and whose
    # attention does not hand the packed lengths on.
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert rlhf(pref_ws, "reward", "model=base:latest", "train.max_steps=2", "max_length=256",
                "bootstrap_samples=100", "normalization_samples=16") == 0
    used = ArtifactStore(pref_ws).resolve("reward:latest").manifest["metrics"]["padding_free"]
    assert used["enabled"] is False
    assert used["reason"].startswith("LlamaModel let packed sequences see each other (hidden states off by")


def test_scoring_runs_packed_with_the_shared_system_prompt_once_and_gives_the_padded_scores(tiny_ws, monkeypatch):
    """`raw_rewards` (the reward stage's evaluation, `rlhf score`, PPO's and compare's reward
    judge) packs its batches: conversations opening with the same system prompt run it once,
    and in fp32 the scores are the padded run's."""
    from rlhf import models, training
    from rlhf.judges import raw_rewards

    store = ArtifactStore(tiny_ws)
    base = store.resolve("base:latest")
    tokenizer = models.load_tokenizer(base)
    model = models.load_sequence_classifier(store, base, pad_token_id=tokenizer.pad_token_id, seed=0)
    lines = (DEMO_DATA / "support_prompts.jsonl").read_text().splitlines()[:6]
    conversations = [json.loads(line)["prompt"] + [{"role": "assistant", "content": reply}]
                     for line, reply in zip(lines, ["Yes.", "Sure, here is how.", "No", "We can help with that today.",
                                                    "Thanks!", "Please send the order number."])]
    assert all(c[0]["role"] == "system" and c[0]["content"] == conversations[0][0]["content"] for c in conversations)
    calls = []
    real = training._shared_prefixes
    monkeypatch.setattr(training, "_shared_prefixes",
                        lambda ids, starts, lengths: calls.append((lengths, real(ids, starts, lengths))) or calls[-1][1])
    monkeypatch.setattr(models, "resolve_precision", lambda precision: "fp32")  # exact comparison
    packed = raw_rewards(model, tokenizer, conversations, batch_size=4)
    # The load check's own probe packs sequences of 8-24 tokens; the conversations are longer.
    batches = [shared for lengths, shared in calls if min(lengths) > 24]
    assert [len(shared) for shared in batches] == [4, 2], "each batch of the scoring must run packed"
    # Every conversation after a batch's first runs without the system prompt it shares.
    system = len(tokenizer(tokenizer.apply_chat_template(conversations[0][:1], tokenize=False),
                           add_special_tokens=False)["input_ids"])
    assert all(p >= system for shared in batches for _, p in shared[1:]), (system, batches)
    padded = raw_rewards(model, tokenizer, conversations, batch_size=4, padding_free=False)
    assert len([lengths for lengths, _ in calls if min(lengths) > 24]) == 2  # padded: nothing more packed
    # Given the load check's decision, it packs without checking again.
    probes = len(calls)
    again = raw_rewards(model, tokenizer, conversations, batch_size=4,
                        padding_free=training.padding_free_decision(model, True))
    assert len(calls) == probes + 1 + 2 and again == packed  # one check here, then the two batches
    assert packed == pytest.approx(padded, rel=1e-4, abs=1e-5)
    assert len(set(packed)) == 6  # distinct conversations, distinct scores: the check means something
