"""`rlhf reward` uses a dataset's margin column when every row has one, and trains without one otherwise.

Issue 13, section 5, defect 16: imports no longer store `margin: null`, so a dataset may have no margin key.
"""

from __future__ import annotations

import json

from conftest import rlhf, write_marker_preferences
from rlhf.artifacts import ArtifactStore


def test_reward_uses_a_margin_only_when_every_row_has_one(tiny_ws, tmp_path):
    plain = write_marker_preferences(tmp_path / "plain.jsonl", n=20)
    with_margin = tmp_path / "margin.jsonl"
    with_margin.write_text("".join(json.dumps({**json.loads(line), "margin": 0.5}) + "\n"
                                   for line in plain.read_text().splitlines()))
    assert rlhf(tiny_ws, "data", "import", "preferences", str(plain), "--name", "plain") == 0
    assert rlhf(tiny_ws, "data", "import", "preferences", str(with_margin), "--name", "margin") == 0

    store = ArtifactStore(tiny_ws)
    for data, used in (("plain", False), ("margin", True)):
        assert rlhf(tiny_ws, "reward", "model=base:latest", f"data={data}:latest", "train.max_steps=1",
                    "train.eval_fraction=0.2", "max_length=256", "bootstrap_samples=100",
                    f"output=reward-{data}") == 0
        assert store.resolve(f"reward-{data}:latest").manifest["metrics"]["used_margin"] is used
