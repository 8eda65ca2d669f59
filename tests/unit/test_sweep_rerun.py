"""A sweep's summary.md "run again" command reproduces the sweep, report name and workspace included
(issue 13, section 5, defect 19); a bad --name fails before any trial (defect 6).

The stage is a stand-in that publishes a checkpoint at once, so this runs in milliseconds.
"""

from __future__ import annotations

import shlex

import pytest

from rlhf import cli
from rlhf.artifacts import ArtifactStore
from rlhf.config import dump


@pytest.fixture
def sweep_ws(tmp_path, monkeypatch) -> tuple:
    """A workspace with sft's default inputs, and a fake sft stage whose eval_loss is lora.r; returns (ws, trained)."""
    ws = tmp_path / "ws"
    store = ArtifactStore(ws)
    for kind, name in (("checkpoint", "base"), ("dataset", "sft")):
        with store.create(kind, name, stage="test") as w:
            (w.path / "x").write_text(name)
    trained = []

    def fake_sft(cfg, store):
        trained.append(cfg.lora.r)
        with store.create("checkpoint", cfg.output, stage="sft", config=dump(cfg)) as w:
            w.metrics["eval_loss"] = float(cfg.lora.r)
        return w.result

    monkeypatch.setattr(cli, "_stage_runner", lambda stage, func=None: None if func else fake_sft)
    return ws, trained


def test_summary_run_again_command_keeps_the_report_name(sweep_ws):
    ws, trained = sweep_ws
    assert cli.main(["--workspace", str(ws), "sweep", "sft", "lora.r=8,16", "--name", "lr-sweep"]) == 0
    summary = (ws / "reports" / "lr-sweep" / "v0001" / "summary.md").read_text().splitlines()
    command = summary[summary.index("Run again (finished trials are reused):") + 2].strip()

    assert command == f"rlhf --workspace {ws} sweep sft lora.r=8,16 --search grid --metric eval_loss --name lr-sweep"
    assert cli.main(shlex.split(command)[1:]) == 0  # the line alone names the workspace
    again = ArtifactStore(ws).resolve("reports/lr-sweep:latest")
    assert again.version == 2 and again.manifest["metrics"]["reused"] == 2
    assert trained == [8, 16]  # the rerun trained nothing


def test_an_invalid_sweep_name_fails_before_any_trial(sweep_ws, capsys):
    ws, trained = sweep_ws

    assert cli.main(["--workspace", str(ws), "sweep", "sft", "lora.r=8,16", "--name", ""]) == 2

    assert capsys.readouterr().err.startswith("error: artifact name '' is not valid;")
    assert trained == []
