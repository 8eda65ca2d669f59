"""`rlhf sweep` on a tiny random Llama: a 2x2 grid, resuming after an interrupt, Optuna search, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import rlhf
from rlhf.artifacts import ArtifactStore

FAST = ["train.batch_size=8", "max_length=256", "train.max_steps=4"]
GRID = ["lora.r=4,8", "train.learning_rate=1e-2,1e-4"]


def trial_versions(ws: Path) -> list[int]:
    return ArtifactStore(ws).versions("checkpoint", "sft-sweep")


def test_grid_sweep_writes_four_trials_and_a_report_naming_the_best(tiny_ws):
    assert rlhf(tiny_ws, "sweep", "sft", *GRID, *FAST) == 0
    store = ArtifactStore(tiny_ws)
    trials = [store.load("checkpoint", "sft-sweep", v) for v in trial_versions(tiny_ws)]
    assert len(trials) == 4
    # Each trial is an ordinary sft checkpoint with its own point of the grid; `sft:latest` is untouched.
    points = {(t.manifest["config"]["lora"]["r"], t.manifest["config"]["train"]["learning_rate"]) for t in trials}
    assert points == {(4, 1e-2), (4, 1e-4), (8, 1e-2), (8, 1e-4)}
    assert all(t.manifest["stage"] == "sft" for t in trials)
    assert not (tiny_ws / "checkpoints" / "sft").exists()

    report = store.resolve("reports/sweep:latest")
    metrics = json.loads((report.path / "metrics.json").read_text())
    best = min(trials, key=lambda t: t.manifest["metrics"]["eval_loss"])
    assert metrics["best"]["ref"] == best.ref == report.manifest["metrics"]["best_ref"]
    assert metrics["best"]["value"] == best.manifest["metrics"]["eval_loss"]
    # 4 steps at 1e-2 learn more than at 1e-4: the search found a real difference.
    assert metrics["best"]["params"]["train.learning_rate"] == "1e-2"
    summary = (report.path / "summary.md").read_text()
    assert f"Best: trial {metrics['best']['trial']}, `{best.ref}`" in summary
    assert sum(line.startswith("| ") and "checkpoints/sft-sweep:v" in line for line in summary.splitlines()) == 4
    assert (report.path / "plots" / "sweep.png").stat().st_size > 1000
    assert sorted(i["ref"] for i in report.manifest["inputs"]) == sorted(t.ref for t in trials)
    assert (metrics["trained"], metrics["reused"]) == (4, 0)


def test_interrupted_sweep_resumes_with_the_trials_it_had_not_finished(tiny_ws, monkeypatch):
    import sft.train

    real_main, calls = sft.train.main, []

    def interrupted_after_two(cfg, store):
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the third trial
        calls.append(cfg)
        return real_main(cfg, store)

    monkeypatch.setattr(sft.train, "main", interrupted_after_two)
    assert rlhf(tiny_ws, "sweep", "sft", *GRID, *FAST) == 130
    assert trial_versions(tiny_ws) == [1, 2]
    assert not (tiny_ws / "reports").exists()

    trained = []
    monkeypatch.setattr(sft.train, "main", lambda cfg, store: trained.append(cfg) or real_main(cfg, store))
    assert rlhf(tiny_ws, "sweep", "sft", *GRID, *FAST) == 0
    assert trial_versions(tiny_ws) == [1, 2, 3, 4]
    # Only the two unfinished points trained; the first two were found by config and input hashes.
    assert [(c.lora.r, c.train.learning_rate) for c in trained] == [(8, 1e-2), (8, 1e-4)]
    metrics = ArtifactStore(tiny_ws).resolve("reports/sweep:latest").manifest["metrics"]
    assert (metrics["trials"], metrics["trained"], metrics["reused"]) == (4, 2, 2)


def test_random_search_over_a_log_range_replays_its_suggestions_on_a_rerun(tiny_ws):
    args = ["--search", "random", "--trials", "3", "--seed", "7", "train.learning_rate=log:1e-4..1e-2",
            "lora.r=4,8", *FAST]
    assert rlhf(tiny_ws, "sweep", "sft", *args) == 0
    store = ArtifactStore(tiny_ws)
    first = json.loads((store.resolve("reports/sweep:v1").path / "metrics.json").read_text())
    rates = [float(t["params"]["train.learning_rate"]) for t in first["trials"]]
    assert len(set(rates)) == 3 and all(1e-4 <= r <= 1e-2 for r in rates)
    assert first["axes"]["train.learning_rate"] == {"low": 1e-4, "high": 1e-2, "log": True}

    assert rlhf(tiny_ws, "sweep", "sft", *args) == 0  # the same seed asks for the same configs
    again = json.loads((store.resolve("reports/sweep:v2").path / "metrics.json").read_text())
    assert [t["ref"] for t in again["trials"]] == [t["ref"] for t in first["trials"]]
    assert (again["trained"], again["reused"]) == (0, 3)
    assert len(trial_versions(tiny_ws)) == 3


@pytest.mark.parametrize("args, expected", [
    (["lora.rr=4,8"], "unknown key 'lora.rr'; did you mean 'lora.r'"),
    (["lora.r=8", "train.max_steps=4"], "nothing to sweep: give at least one key with several values"),
    (["train.learning_rate=1e-4..1e-2"], "grid search needs a list of values for train.learning_rate"),
    (["--trials", "3", "lora.r=4,8"], "--trials applies to --search random or tpe"),
    (["--search", "tpe", "lora.r=4,8"], "--search tpe needs --trials N"),
    (["--search", "random", "--trials", "2", "train.learning_rate=log:0..1e-2"], "a log range needs a positive low"),
    (["lora.r=4,8", "lora.r=16"], "sweep key 'lora.r' is given more than once"),
    (["output=a,b"], "output cannot be a sweep axis"),
    (["mode=freeze", "freeze.trainable_layers=1,5"],
     "freeze.trainable_layers=5 but checkpoints/base:v1 has 2 transformer blocks"),
    (["mode=peft", "peft.method=ia3,lorra"], "peft.method=lorra is not a peft method"),
])
def test_bad_sweeps_fail_in_one_line_before_any_trial_trains(tiny_ws, capsys, args, expected):
    assert rlhf(tiny_ws, "sweep", "sft", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert trial_versions(tiny_ws) == []
    assert not (tiny_ws / "reports").exists()


def test_an_unknown_metric_names_the_ones_there_are_and_keeps_the_finished_trial(tiny_ws, capsys):
    assert rlhf(tiny_ws, "sweep", "sft", "lora.r=4,8", "--metric", "eval_acc", *FAST) == 2
    err = capsys.readouterr().err
    assert "--metric eval_acc is not a number in checkpoints/sft-sweep:v1's metrics" in err and "eval_loss" in err
    assert trial_versions(tiny_ws) == [1]
    assert rlhf(tiny_ws, "sweep", "sft", "lora.r=4,8", *FAST) == 0
    assert ArtifactStore(tiny_ws).resolve("reports/sweep:latest").manifest["metrics"]["reused"] == 1
