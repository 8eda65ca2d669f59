"""Data cleaning on import: each step is opt-in, and the manifest counts exactly what it dropped or changed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import DEMO_DATA, rlhf
from rlhf.artifacts import ArtifactStore
from rlhf.cleaning import drop_near_duplicates, normalize_whitespace, shingles, jaccard

BASE = [json.loads(line)["messages"] for line in (DEMO_DATA / "support_sft.jsonl").read_text().splitlines()[:12]]


def with_reply(messages: list[dict], reply: str) -> list[dict]:
    return messages[:-1] + [{"role": "assistant", "content": reply}]


def known_file(path: Path) -> Path:
    """12 distinct demo rows plus, each a known number of times:

    2 exact copies of row 0, 1 copy of row 1 that differs only in spacing, 1 near copy of row 2
    (one word changed), 1 row whose reply is blank, 1 row far too long, 1 row far too short.
    """
    assert all(normalize_whitespace(m["content"]) == m["content"] for r in BASE for m in r)
    reply_1, reply_2 = BASE[1][-1]["content"], BASE[2][-1]["content"]
    rows = BASE + [
        BASE[0], BASE[0],
        with_reply(BASE[1], "  " + reply_1.replace(" ", "   ", 3) + " \r\n"),
        with_reply(BASE[2], reply_2.replace(" ", " truly ", 1)),
        with_reply(BASE[3], "   "),
        with_reply(BASE[4], " ".join([BASE[4][-1]["content"]] * 20)),
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]
    random.Random(0).shuffle(rows[12:])  # duplicates come after their originals, in no special order
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return path


def test_each_cleaning_step_counts_exactly_what_it_removed(tiny_ws, tmp_path, capsys):
    src = known_file(tmp_path / "dirty.jsonl")
    # Without --drop-empty-turns the blank reply is an error, as before.
    assert rlhf(tiny_ws, "data", "import", "sft", str(src), "--name", "dirty") == 2
    assert "empty or non-text content" in capsys.readouterr().err

    assert rlhf(tiny_ws, "data", "import", "sft", str(src), "--name", "clean", "--normalize-whitespace",
                "--drop-empty-turns", "--dedup", "near", "--min-tokens", "60", "--max-tokens", "600",
                "--tokenizer", "base:latest") == 0
    art = ArtifactStore(tiny_ws).resolve("clean:latest")
    assert art.manifest["metrics"]["cleaning"] == {
        "whitespace_normalized": 2,  # row 1's spaced-out copy, and the blank reply (trimmed, then dropped)
        "empty_turns_dropped": 1,
        "too_short_dropped": 1,
        "too_long_dropped": 1,
        "exact_duplicates_dropped": 3,  # two copies of row 0, and row 1 once its spacing is normalised
        "near_duplicates_dropped": 1,
    }
    rows = [json.loads(line) for line in (art.path / "data.jsonl").read_text().splitlines()]
    assert len(rows) == art.manifest["metrics"]["rows"] == 12
    assert [r["prompt"] + r["completion"] for r in rows] == BASE  # the originals, first of each set kept
    assert art.manifest["config"]["cleaning"] == {
        "normalize_whitespace": True, "drop_empty_turns": True, "dedup": "near", "near_threshold": 0.8,
        "min_tokens": 60, "max_tokens": 600, "tokenizer": "base:latest"}
    assert {i["role"]: i.get("ref") for i in art.manifest["inputs"]}["tokenizer"] == "checkpoints/base:v1"
    out = capsys.readouterr().out
    assert "cleaning: exact duplicates dropped: 3" in out and "cleaning: near duplicates dropped: 1" in out


def test_exact_dedup_alone_keeps_whitespace_variants_and_near_copies(tiny_ws, tmp_path):
    src = known_file(tmp_path / "dirty.jsonl")
    assert rlhf(tiny_ws, "data", "import", "sft", str(src), "--name", "exact", "--dedup", "exact",
                "--drop-empty-turns") == 0
    m = ArtifactStore(tiny_ws).resolve("exact:latest").manifest["metrics"]
    assert m["cleaning"] == {"empty_turns_dropped": 1, "exact_duplicates_dropped": 2}
    assert m["rows"] == 12 + 4  # + the spaced-out copy, the near copy, the long row and the short one


def test_no_cleaning_flags_means_no_cleaning_record(tiny_ws):
    assert "cleaning" not in ArtifactStore(tiny_ws).resolve("datasets/sft:v1").manifest["metrics"]


@pytest.mark.parametrize("args, expected", [
    (["--near-threshold", "0.9"], "--near-threshold applies to --dedup near"),
    (["--dedup", "near", "--near-threshold", "1.5"], "give a Jaccard similarity in (0, 1]"),
    (["--min-tokens", "50", "--max-tokens", "10"], "--min-tokens 50 is above --max-tokens 10"),
    (["--tokenizer", "base:latest"], "--tokenizer is only used by --min-tokens/--max-tokens"),
    (["--max-tokens", "100", "--tokenizer", "nope:latest"], "count tokens with --tokenizer nope:latest"),
])
def test_bad_cleaning_flags_fail_in_one_line_and_import_nothing(tiny_ws, capsys, args, expected):
    assert rlhf(tiny_ws, "data", "import", "sft", str(DEMO_DATA / "support_sft.jsonl"), "--name", "x", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tiny_ws / "datasets" / "x").exists()


# -- the steps themselves --------------------------------------------------------------------


def test_whitespace_normalisation_keeps_indentation_and_one_blank_line():
    text = "  Hi  there, \r\n\r\n\r\n    indented   code\t\n\u00a0end  "
    assert normalize_whitespace(text) == "Hi there,\n\n    indented code\n end"


def test_near_duplicates_are_confirmed_by_exact_jaccard():
    a = "The parcel left our warehouse on Monday and should arrive within three working days."
    b = a.replace("three", "four")
    c = "Completely different words about refunds, returns and the store credit policy here."
    rows = [{"prompt": [{"role": "user", "content": t}], "completion": []} for t in (a, b, c)]

    assert jaccard(shingles(a), shingles(b)) > 0.8 > jaccard(shingles(a), shingles(c))
    kept, dropped = drop_near_duplicates(rows, threshold=0.8)
    assert dropped == 1 and [r["prompt"][0]["content"] for r in kept] == [a, c]
    # Above the pair's similarity nothing is a near copy.
    assert drop_near_duplicates(rows, threshold=0.99)[1] == 0
