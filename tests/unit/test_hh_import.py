"""The HH-RLHF importer on real lines from ../shared/data/hh-rlhf-harmless."""

import json

import pytest

from conftest import shared_data
from rlhf.artifacts import ArtifactStore
from rlhf.data import RowDropped, RowError, from_hh, import_dataset, parse_hh


def test_transcript_splits_into_alternating_turns():
    turns = parse_hh("\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine.", "chosen")
    assert turns == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]


def test_rows_that_differ_before_the_last_reply_or_end_on_a_human_turn_are_dropped():
    with pytest.raises(RowDropped, match="differ before the final reply"):
        from_hh({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: c"})
    with pytest.raises(RowDropped, match="not an assistant reply"):
        from_hh({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: d"})
    with pytest.raises(RowError, match="does not start"):
        from_hh({"chosen": "Human: a", "rejected": "\n\nHuman: a\n\nAssistant: d"})


def test_real_first_line_becomes_a_shared_prompt_and_two_replies():
    line = shared_data("hh-rlhf-harmless/train.jsonl").read_text().splitlines()[0]
    raw = json.loads(line)
    row = from_hh(raw)
    assert row["prompt"][0]["role"] == "user" and row["prompt"][-1]["role"] == "user"
    assert raw["chosen"].endswith(row["chosen"][0]["content"])
    assert raw["rejected"].endswith(row["rejected"][0]["content"])
    assert row["chosen"] != row["rejected"]


def test_import_of_the_real_train_split_counts_what_it_drops(tmp_path):
    path = shared_data("hh-rlhf-harmless/train.jsonl")
    n_lines = len(path.read_text().splitlines())
    art = import_dataset(ArtifactStore(tmp_path), "preferences", path, name="hh", fmt="hh")
    m = art.manifest["metrics"]
    assert m["rows"] + m["filtered"] == n_lines == 1200
    assert m["filtered"] >= 1 and sum(m["filter_reasons"].values()) == m["filtered"]
    assert art.manifest["config"]["format"] == "hh"
