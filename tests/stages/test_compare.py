"""`rlhf compare` on tiny checkpoints: judged battles, cached answers, human votes, bad judges."""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_DATA, rlhf
from labeling_app.export import export_ab
from labeling_app.labels import load_ab_task_set
from labeling_app.simulated import run_annotators
from labeling_app.store import LabelStore
from rlhf.artifacts import ArtifactStore
from rlhf.judges import gold_score

COMPARE = ["data=heldout:latest", "limit=6", "sampling.max_new_tokens=10", "bootstrap_samples=100"]


@pytest.fixture
def three_policies(pref_ws):
    """base:v1 plus two short SFT runs (sft:v1, sft:v2), a reward model, and held-out prompts."""
    for seed in (1, 2):
        assert rlhf(pref_ws, "sft", "model=base:latest", "train.max_steps=2", "train.batch_size=4",
                    "max_length=128", f"train.seed={seed}", "train.learning_rate=5e-3") == 0
    assert rlhf(pref_ws, "reward", "model=base:latest", "train.max_steps=2", "max_length=256",
                "bootstrap_samples=100", "normalization_samples=32") == 0
    assert rlhf(pref_ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts_heldout.jsonl"),
                "--name", "heldout") == 0
    return pref_ws


def report_rows(art):
    return [json.loads(line) for line in (art.path / "responses.jsonl").read_text().splitlines()]


def test_compare_judges_every_pair_and_reuses_cached_answers(three_policies, capsys):
    ws = three_policies
    assert rlhf(ws, "compare", "base:latest", "sft:v1", "sft:v2", "judge=gold,reward:latest", *COMPARE) == 0
    printed = capsys.readouterr().out
    store = ArtifactStore(ws)
    report = store.resolve("reports/compare:v1")
    m = json.loads((report.path / "metrics.json").read_text())
    assert m["models"] == {"base": "checkpoints/base:v1", "sft:v1": "checkpoints/sft:v1", "sft:v2": "checkpoints/sft:v2"}
    assert set(m["judges"]) == {"gold", "reward:checkpoints/reward:v1"}

    # The gold win-rates follow from the saved answers, recomputed here from the texts.
    rows = report_rows(report)
    assert len(rows) == 6
    gold = m["judges"]["gold"]
    pair = next(p for p in gold["pairs"] if (p["a"], p["b"]) == ("sft:v1", "base"))
    scores = [(gold_score(r["prompt"], r["responses"]["sft:v1"]["text"]),
               gold_score(r["prompt"], r["responses"]["base"]["text"])) for r in rows]
    wins, ties = sum(a > b for a, b in scores), sum(a == b for a, b in scores)
    assert (pair["wins"], pair["ties"], pair["n"]) == (wins, ties, 6)
    assert pair["win_rate"] == pytest.approx((wins + ties / 2) / 6)
    assert pair["ci95"][0] <= pair["win_rate"] <= pair["ci95"][1]
    assert len(gold["pairs"]) == 3 and len(gold["leaderboard"]) == 3
    assert {r["model"] for r in gold["leaderboard"]} == {"base", "sft:v1", "sft:v2"}
    assert m["judge_agreement"][0]["n"] == 18  # 6 prompts x 3 pairs, judged by both
    assert "| pair | win / tie / loss |" in printed and "Judge: gold" in printed
    html = (report.path / "report.html").read_text()
    assert "data:image/png;base64," in html and "Responses, side by side" in html

    roles = {i["role"]: i["ref"] for i in report.manifest["inputs"]}
    assert roles["model:sft:v2"] == "checkpoints/sft:v2" and roles["judge:reward"] == "checkpoints/reward:v1"
    assert roles["data"] == "datasets/heldout:v1"
    answers = {r for r in roles if r.startswith("responses:")}
    assert len(answers) == 3

    # Asking again reuses the three cached answer sets and reaches the same verdicts.
    n_datasets = len(store.list())
    assert rlhf(ws, "compare", "base:latest", "sft:v1", "sft:v2", "judge=gold", *COMPARE) == 0
    again = store.resolve("reports/compare:v2")
    assert len(store.list()) == n_datasets + 1  # only the new report
    assert json.loads((again.path / "metrics.json").read_text())["judges"]["gold"]["pairs"] == gold["pairs"]


def test_compare_reads_blind_a_b_votes_as_the_human_judge(three_policies):
    ws = three_policies
    assert rlhf(ws, "compare", "base:latest", "sft:v1", "judge=gold", *COMPARE) == 0
    store = ArtifactStore(ws)
    report = store.resolve("reports/compare:latest")
    roles = {i["role"]: i["ref"] for i in report.manifest["inputs"]}
    labels = LabelStore.for_workspace(ws)
    name = load_ab_task_set(labels, store, roles["responses:base"], roles["responses:sft"]).task_set.name
    run_annotators(labels, ["ann-1", "ann-2"], name, seed=0, temperature=0.5)
    votes = export_ab(store, labels, task_set=name)

    assert rlhf(ws, "compare", "base:latest", "sft:v1", "judge=human:ab_votes:latest", *COMPARE) == 0
    m = store.resolve("reports/compare:latest").manifest["metrics"]
    [pair] = m["judges"][f"human:{votes.ref}"]["pairs"]
    rows = [json.loads(line) for line in (votes.path / "data.jsonl").read_text().splitlines()]
    sft_wins = sum((r["choice"] == "A") == (r["model_a"] == "sft:v1") and r["choice"] in "AB" for r in rows)
    assert (pair["a"], pair["b"], pair["n"], pair["wins"]) == ("sft", "base", len(rows), sft_wins)


BAD_REQUESTS = [
    (["base:latest", "sft:v1", "judge=oracle"], "unknown judge 'oracle'"),
    (["base:latest", "sft:v1", "judge=reward:sft:v1"], "not a reward model"),
    (["base:latest", "sft:v1", "judge=human:preferences:v1"], "is not an A/B votes dataset"),
    (["base:latest"], "models: List should have at least 2 items"),
    (["base:latest", "nope:latest"], "no artifact named 'nope'"),
    (["base:latest", "reward:latest"], "is a reward model, not a causal LM"),
]


def test_bad_compare_requests_fail_before_any_generation(three_policies, capsys):
    store = ArtifactStore(three_policies)
    before = len(store.list())
    for args, message in BAD_REQUESTS:
        assert rlhf(three_policies, "compare", *args, *COMPARE) == 2, args
        assert message in capsys.readouterr().err, args
    assert len(store.list()) == before
