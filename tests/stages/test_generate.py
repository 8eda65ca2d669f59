"""`rlhf generate` on the tiny model: k seeded samples per prompt, duplicates removed and counted."""

from __future__ import annotations

import json

from conftest import DEMO_DATA, rlhf
from rlhf.artifacts import ArtifactStore


def rows_of(art):
    return [json.loads(line) for line in (art.path / "data.jsonl").read_text().splitlines()]


def test_generate_samples_k_candidates_per_prompt_deterministically(tiny_ws):
    assert rlhf(tiny_ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")) == 0
    args = ["generate", "model=base:latest", "k=4", "limit=6", "sampling.max_new_tokens=12", "batch_size=4"]
    assert rlhf(tiny_ws, *args) == 0
    assert rlhf(tiny_ws, *args) == 0
    store = ArtifactStore(tiny_ws)
    first, second = store.resolve("candidates:v1"), store.resolve("candidates:v2")
    rows = rows_of(first)
    assert len(rows) == 6 and rows == rows_of(second)  # same seed, same samples
    m = first.manifest["metrics"]
    assert m["responses"] + m["duplicates_removed"] + m["empty_removed"] == 6 * 4
    for row in rows:
        texts = [r["text"] for r in row["responses"]]
        assert len(set(texts)) == len(texts) and all(r["model"] == "base:v1" for r in row["responses"])
        assert len({r["response_id"] for r in row["responses"]}) == len(texts)
    assert {i["role"] for i in first.manifest["inputs"]} == {"model", "data"}
    assert first.manifest["config"]["schema"] == "candidates"


def test_greedy_samples_collapse_to_one_response_and_are_counted(tiny_ws):
    assert rlhf(tiny_ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")) == 0
    assert rlhf(tiny_ws, "generate", "model=base:latest", "k=3", "limit=2", "sampling.temperature=0",
                "sampling.max_new_tokens=6") == 0
    art = ArtifactStore(tiny_ws).resolve("candidates:latest")
    # Greedy decoding gives k identical samples: one kept per prompt, the rest counted as duplicates.
    assert [len(r["responses"]) for r in rows_of(art)] == [1, 1]
    assert art.manifest["metrics"]["duplicates_removed"] == 4
