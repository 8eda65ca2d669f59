"""The dashboard's data, read from a workspace built by `build_dashboard_workspace` (no models).

Expected numbers are the ones the builder wrote, so each assertion can fail on a parsing slip.
"""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import HUMAN_JUDGE, JUDGE_REWARD, build_dashboard_workspace
from labeling_app import dashboard
from rlhf.artifacts import ArtifactStore

EDGE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)" \[label="((?:[^"\\]|\\.)*)"', re.M)


@pytest.fixture
def ws(tmp_path):
    arts = build_dashboard_workspace(tmp_path / "ws")
    return ArtifactStore(tmp_path / "ws"), arts


def edges(dot: str) -> set[tuple[str, str, str]]:
    return set(EDGE.findall(dot))


def test_one_row_per_artifact_with_its_key_metrics_first(ws):
    store, arts = ws
    rows = {r["ref"]: r for r in dashboard.artifact_rows(store)}
    assert len(rows) == len(arts) == 11
    sft = rows["checkpoints/sft:v1"]
    assert (sft["kind"], sft["stage"], sft["hash"]) == ("checkpoint", "sft", arts["sft"].content_hash[:12])
    assert sft["created_at"] == arts["sft"].manifest["created_at"]
    assert sft["metrics"] == "eval_loss=1.4, eval_loss_initial=2.1"  # "mode" is text, left out
    # The accuracy first; its CI is a list, so not a scalar summary.
    assert rows["checkpoints/reward:v1"]["metrics"] == "eval_accuracy=0.75, eval_pairs=8"
    assert {"metric": "eval_accuracy_ci95", "value": "[0.6, 0.875]"} in dashboard.metrics_table(arts["reward_human"])


def test_lineage_dot_has_an_edge_per_input_labelled_by_role(ws):
    store, _ = ws
    dot = dashboard.lineage_dot(store)
    got = edges(dot)
    assert ("checkpoints/base:v1", "checkpoints/sft:v1", "model") in got
    assert ("datasets/sft:v1", "checkpoints/sft:v1", "data") in got
    assert ("datasets/preferences:v1", "checkpoints/reward:v1", "data") in got
    assert ("datasets/hh:v1", "checkpoints/reward:v2", "data") in got
    assert ("checkpoints/reward:v1", "checkpoints/ppo:v1", "reward") in got
    # 2 sft + 1 candidates + 1 preferences + 2 + 2 rewards + 3 dpo + 4 ppo + 3 report + 1 file = 19
    assert len(got) == 19
    # The raw file input has no ref: it is a node named by its path, its quotes escaped.
    [(file_node, base, role)] = [e for e in got if e[1] == "checkpoints/base:v1"]
    assert role == "gguf" and file_node.startswith("file:") and file_node.endswith('model \\"q8\\".gguf')
    assert 'model "q8"' not in dot


def test_lineage_of_one_ref_is_only_its_ancestry(ws):
    store, _ = ws
    got = edges(dashboard.lineage_dot(store, "ppo:latest"))
    assert {dst for _, dst, _ in got} == {"checkpoints/ppo:v1", "checkpoints/sft:v1", "checkpoints/base:v1",
                                         "checkpoints/reward:v1", "datasets/preferences:v1",
                                         "datasets/sft-candidates:v1"}
    nodes = {n for e in got for n in e[:2]}
    assert not nodes & {"checkpoints/dpo:v1", "checkpoints/reward:v2", "datasets/hh:v1", "reports/compare:v1"}
    assert ("checkpoints/sft:v1", "checkpoints/ppo:v1", "reference") in got and len(got) == 11


def test_an_input_missing_from_the_workspace_is_drawn_dashed(ws):
    store, arts = ws
    shutil.rmtree(arts["dpo"].path)
    dot = dashboard.lineage_dot(store, "reports/compare:v1")
    assert ("checkpoints/dpo:v1", "reports/compare:v1", "model") in edges(dot)
    assert '"checkpoints/dpo:v1" [label="checkpoints/dpo:v1 (missing)", style="rounded,dashed"];' in dot


def test_training_curves_merge_train_and_eval_entries_per_step(ws):
    _, arts = ws
    curves = dashboard.training_curves(arts["sft"])
    assert list(curves.index) == [5, 10]
    assert list(curves["loss"]) == [2.0, 1.5] and list(curves["eval_loss"]) == [1.9, 1.4]
    assert list(curves["learning_rate"]) == [1e-4, 5e-5]
    assert "train_loss" not in curves and "total_flos" not in curves  # the run summary is no curve
    assert dashboard.training_curves(arts["dpo"]) is None
    assert dashboard.plot_images(arts["sft"]) == [arts["sft"].path / "logs" / "loss.png"]


def test_ppo_curves_per_iteration_and_held_out_evals(ws):
    _, arts = ws
    ppo = dashboard.ppo_curves(arts["ppo"])
    assert list(ppo.iterations.index) == [1, 2, 3]
    assert list(ppo.iterations["score"]) == [-0.5, 0.1, 0.7] and list(ppo.iterations["kl"]) == [0.0, 0.4, 0.9]
    assert list(ppo.iterations["clipfrac"]) == pytest.approx([0.1, 0.2, 0.3])
    assert list(ppo.evals.index) == [0, 3] and list(ppo.evals["score"]) == [-0.4, 0.6]
    assert "samples" not in ppo.evals  # sample texts are not curves
    # Held-out scores exist only at iterations 0 and 3; in long form each curve keeps just its own points.
    long = dashboard.long_form(ppo.scores(), ["rollout score", "held-out score"])
    assert list(long.columns) == ["iteration", "curve", "value"]
    assert long[long["curve"] == "held-out score"][["iteration", "value"]].values.tolist() == [[0, -0.4], [3, 0.6]]
    assert long[long["curve"] == "rollout score"]["value"].tolist() == [-0.5, 0.1, 0.7]
    assert dashboard.ppo_curves(arts["sft"]) is None


def test_compare_reports_give_each_judges_leaderboard_and_pairs(ws):
    store, _ = ws
    [report] = dashboard.compare_reports(store)
    assert (report.ref, report.n_prompts, report.prompts) == ("reports/compare:v1", 120, "datasets/heldout:v1")
    assert report.models["ppo"] == "checkpoints/ppo:v1" and report.mean_length["sft"] == 52.3
    assert list(report.judges) == ["gold", JUDGE_REWARD]
    board = report.judges["gold"].leaderboard
    assert board.to_dict("records") == [
        {"rank": 1, "model": "ppo", "rating": 1052.1, "95% CI": "1020.3 – 1081.0", "mean score": 2.0,
         "mean length": 38.0},
        {"rank": 2, "model": "dpo", "rating": 1010.4, "95% CI": "985.0 – 1033.2", "mean score": 1.9,
         "mean length": 40.1}]
    pairs = report.judges["gold"].pairs
    assert list(pairs["a's win rate [95% CI]"]) == ["60.4% [52.0%, 68.0%]", "66.7% [58.0%, 75.0%]"]
    assert list(pairs["length-controlled"]) == ["58.0%", "n/a"]  # lc_win_rate null -> n/a
    assert pairs.iloc[0][["a wins", "ties", "b wins", "n"]].tolist() == [70, 5, 45, 120]
    assert report.judges[JUDGE_REWARD].leaderboard.empty  # an empty leaderboard is allowed
    assert report.agreement.to_dict("records")[0] == {"judges": f"gold vs {JUDGE_REWARD}", "agreement": "71.0%",
                                                      "n": 360}


def test_reward_agreement_tells_human_labelled_data_from_imported(ws):
    store, _ = ws
    agreement = dashboard.reward_agreement(store)
    rows = {r["reward model"]: r for r in agreement.reward_models.to_dict("records")}
    human, imported = rows["checkpoints/reward:v1"], rows["checkpoints/reward:v2"]
    assert human["preference data"] == "datasets/preferences:v1" and human["human labels"]
    assert human["held-out accuracy [95% CI]"] == "75.0% [60.0%, 87.5%]" and human["eval pairs"] == 8
    assert imported["preference data"] == "datasets/hh:v1" and not imported["human labels"]
    assert imported["data from"] == "data import" and imported["held-out accuracy [95% CI]"] == "90.0% [85.0%, 94.0%]"
    # Only the compare agreement that involves a human judge.
    assert agreement.human_judges.to_dict("records") == [
        {"report": "reports/compare:v1", "judges": f"{HUMAN_JUDGE} vs gold", "agreement": "64.0%", "n": 50}]


def test_an_empty_workspace_gives_empty_answers(tmp_path):
    store = ArtifactStore(tmp_path / "empty")
    assert dashboard.artifact_rows(store) == [] and dashboard.compare_reports(store) == []
    assert not edges(dashboard.lineage_dot(store))
    agreement = dashboard.reward_agreement(store)
    assert agreement.reward_models.empty and agreement.human_judges.empty
