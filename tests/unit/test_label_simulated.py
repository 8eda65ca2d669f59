"""Simulated annotators: Plackett–Luce sampling, calibration to 73% agreement, runs through the store API."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from labeling_app.labels import agreement_report, label_records, load_ab_task_set, load_task_set
from labeling_app.simulated import calibrate_temperature, expected_agreement, plackett_luce, run_annotators
from labeling_app.store import LabelStore
from rlhf import data
from rlhf.artifacts import ArtifactStore
from rlhf.errors import RlhfError


def score_from_text(prompt, text: str) -> float:
    """A stub gold scorer: each synthetic response carries its score in its text."""
    return float(text.split("score=")[1])


def synthetic_rows(n_items: int, n_responses: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
             "responses": [{"response_id": f"r{j}", "text": f"reply {j} score={rng.gauss(0, 1):.4f}",
                            "model": "checkpoints/sft:v1"} for j in range(n_responses)]} for i in range(n_items)]


def publish(arts: ArtifactStore, rows: list[dict], name: str = "candidates") -> str:
    with arts.create("dataset", name, stage="generate", config={"schema": "candidates"}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
    return w.result.ref


@pytest.fixture
def arts(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "ws")


def new_store(tmp_path, name: str = "labels.db") -> LabelStore:
    return LabelStore(f"sqlite:///{tmp_path / name}")


def test_plackett_luce_samples_match_the_model():
    # Weights e^u = 1, 2, 4. P(first = i) = w_i / 7; P(order 2,1,0) = 4/7 · 2/3 = 8/21.
    # Pairwise marginal is Bradley–Terry: P(0 above 2) = 1 / (1 + 4) = 0.2.
    rng = random.Random(0)
    utilities = [0.0, math.log(2), math.log(4)]
    orders = [tuple(plackett_luce(utilities, rng)) for _ in range(40_000)]
    first = Counter(o[0] for o in orders)
    for i, expected in enumerate((1 / 7, 2 / 7, 4 / 7)):
        assert first[i] / len(orders) == pytest.approx(expected, abs=0.01)
    assert Counter(orders)[2, 1, 0] / len(orders) == pytest.approx(8 / 21, abs=0.01)
    assert sum(o.index(0) < o.index(2) for o in orders) / len(orders) == pytest.approx(0.2, abs=0.01)


def test_expected_agreement_by_hand():
    # One pair, scores 0 and 1, T = 1: p = sigmoid(1) = 0.731059; p² + (1-p)² = 0.534447 + 0.072329 = 0.606776.
    assert expected_agreement([[0.0, 1.0]], 1.0) == pytest.approx(0.606776, abs=1e-6)
    # Equal scores: p = 1/2 at any temperature, agreement 1/2.
    assert expected_agreement([[3.0, 3.0]], 0.01) == 0.5


def test_calibrated_annotators_agree_on_about_73_percent_of_pairs():
    rows = synthetic_rows(300)
    cal = calibrate_temperature(score_from_text, rows, target=0.73, seed=0)
    assert cal.expected_agreement == pytest.approx(0.73, abs=1e-6)
    # 300 items x 6 pairs = 1800 comparisons: the sampling SE is about 1 point.
    assert abs(cal.measured_agreement - 0.73) <= 0.04
    # A different seed is another independent check of the same temperature.
    assert abs(calibrate_temperature(score_from_text, rows, seed=1).measured_agreement - 0.73) <= 0.04
    # Less agreement needs more noise.
    assert calibrate_temperature(score_from_text, rows, target=0.6).temperature > cal.temperature


def test_calibration_refuses_targets_it_cannot_reach():
    flat = [{"prompt": [], "responses": [{"text": "score=1"}, {"text": "score=1"}]}]
    with pytest.raises(RlhfError, match="same score"):
        calibrate_temperature(score_from_text, flat)
    with pytest.raises(RlhfError, match="between 0.5"):
        calibrate_temperature(score_from_text, synthetic_rows(3), target=0.4)
    # Half the pairs tied by the scorer: at best (1 + 0.5) / 2 = 75%, so 80% is out of reach.
    half_tied = [{"prompt": [], "responses": [{"text": "score=0"}, {"text": "score=0"}]},
                 {"prompt": [], "responses": [{"text": "score=0"}, {"text": "score=1"}]}]
    with pytest.raises(RlhfError, match="ties too many pairs"):
        calibrate_temperature(score_from_text, half_tied, target=0.8)


def test_simulated_annotators_label_everything_through_the_store_at_73_percent_agreement(arts, tmp_path):
    store = new_store(tmp_path)
    name = load_task_set(store, arts, publish(arts, synthetic_rows(150)), overlap=2).task_set.name
    result = run_annotators(store, ["sim-1", "sim-2"], name, seed=0, score_fn=score_from_text)
    assert len(result.submitted) == 300 and len(result.submit_seconds) == 300
    records = label_records(store, name)
    assert Counter(r.item_id for r in records) == Counter({i.id: 2 for i in store.items(name)})
    # The agreement the store's own admin report measures, not only the calibration's
    # (150 items x 6 pairs = 900 comparisons; across seeds it lands within about 0.02).
    assert abs(agreement_report(store, name).pairwise.rate - 0.73) <= 0.04
    assert run_annotators(store, ["sim-1", "sim-2"], name, seed=0, score_fn=score_from_text).submitted == []
    store.close()


def test_a_seed_gives_the_same_labels(arts, tmp_path):
    ref = publish(arts, synthetic_rows(10))

    def labels(db: str, seed: int):
        store = new_store(tmp_path, db)
        name = load_task_set(store, arts, ref, overlap=2).task_set.name
        run_annotators(store, ["a", "b", "c"], name, seed=seed, score_fn=score_from_text)
        out = {(r.annotator, r.prompt_id): (r.ranking, r.shown_order) for r in label_records(store, name)}
        store.close()
        return out

    first = labels("one.db", seed=7)
    assert len(first) == 20 and first == labels("two.db", seed=7)
    assert first != labels("three.db", seed=8)


def test_simulated_annotators_vote_in_ab_mode(arts, tmp_path):
    rows = synthetic_rows(40, n_responses=1)
    worse = [{**r, "responses": [{**r["responses"][0], "response_id": "w", "model": "checkpoints/base:v1",
                                  "text": "worse score=-2"}]} for r in rows]
    store = new_store(tmp_path)
    name = load_ab_task_set(store, arts, publish(arts, rows, "good"), publish(arts, worse, "bad")).task_set.name
    run_annotators(store, ["sim-1"], name, seed=0, score_fn=score_from_text, temperature=0.5)
    records = label_records(store, name)
    assert len(records) == 40 and {r.choice for r in records} <= {"A", "B"}
    winners = Counter(r.model_a if r.choice == "A" else r.model_b for r in records)
    # Scores ~N(0, 1) against -2 at T = 0.5: the better model should win most votes.
    assert winners["checkpoints/sft:v1"] > 30
    store.close()


def test_the_default_scorer_is_the_demo_gold_scorer(arts, tmp_path):
    prompt = [{"role": "user", "content": "My lamp arrived with a cracked base. What now?"}]
    replies = [("Sorry about the cracked lamp base! Reply with your order number and a photo and we will send "
                "a replacement."), "Not my problem.", "Our sofas come in six colours.",
               "I'm sorry to hear that. Please send a photo of the lamp base and we'll replace it."]
    rows = [{"prompt_id": f"p{i}", "prompt": prompt,
             "responses": [{"response_id": f"r{j}", "text": t, "model": "m"} for j, t in enumerate(replies)]}
            for i in range(5)]
    store = new_store(tmp_path)
    name = load_task_set(store, arts, publish(arts, rows), overlap=2).task_set.name
    result = run_annotators(store, ["sim-1", "sim-2"], name, seed=0)
    assert result.temperature > 0 and len(result.submitted) == 10
    store.close()
