"""A damaged input fails the stage before any loading: one line naming the file or the edited
manifest and `rlhf artifacts verify`, exit 2, nothing published."""

from __future__ import annotations

import json

import pytest

from conftest import rlhf

pytestmark = pytest.mark.faults


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def edit_metrics(path):
    manifest = json.loads(path.read_text())
    manifest["metrics"]["parameters"] = 1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("command", [["generate", "model=base:latest", "data=sft:latest", "limit=1"],
                                     ["sft", "train.max_steps=1"]], ids=["generate", "sft"])
@pytest.mark.parametrize("damage, file, expected", [
    (lambda p: p.unlink(), "model.safetensors", "model.safetensors is missing"),
    (truncate, "model.safetensors", "model.safetensors is 100 bytes where its manifest records"),
    (edit_metrics, "manifest.json", "manifest.json was edited after publishing"),
], ids=["deleted", "truncated", "edited manifest"])
def test_a_damaged_model_fails_in_one_line_before_loading(tiny_ws, capsys, command, damage, file, expected):
    damage(tiny_ws / "checkpoints" / "base" / "v0001" / file)
    capsys.readouterr()

    assert rlhf(tiny_ws, *command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoints/base:v1 is damaged: ") and expected in err, err
    assert "\n" not in err and err.endswith("run `rlhf artifacts verify checkpoints/base:v1`")
    assert not (tiny_ws / "checkpoints" / "sft").exists() and not (tiny_ws / "datasets" / "candidates").exists()
