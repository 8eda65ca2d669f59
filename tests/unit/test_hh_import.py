"""The HH-RLHF importer on real lines from ../shared/data/hh-rlhf-harmless, and preference rows stored as plain TRL data."""

import json

import pytest

from conftest import shared_data
from rlhf.artifacts import ArtifactStore
from rlhf.data import RowDropped, RowError, from_hh, import_dataset, parse_hh
from rlhf.errors import RlhfError


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


# -- the stored rows are plain TRL data (issue 13, section 5, defect 16) -----------------------


def hh_line(question: str, good: str, bad: str) -> str:
    return json.dumps({"chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
                       "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}"})


def collate_stored_rows(art):
    """Read data.jsonl as a plain TRL user would and collate it with TRL's own reward collator."""
    from datasets import load_dataset
    from trl.trainer.reward_trainer import DataCollatorForPreference

    ds = load_dataset("json", data_files=str(art.path / "data.jsonl"), split="train")
    # Token ids stand in for tokenisation; the collator reads every other column as stored.
    examples = [{**row, "chosen_ids": [1, 2], "rejected_ids": [3]} for row in ds]
    return ds, DataCollatorForPreference(pad_token_id=0)(examples)


def test_hh_import_stores_no_null_margin_and_trl_reward_collator_takes_it(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(hh_line(f"Question {i}?", f"Kind answer {i}.", f"Rude answer {i}.")
                              for i in range(3)) + "\n")

    art = import_dataset(ArtifactStore(tmp_path / "ws"), "preferences", path, name="hh", fmt="hh")

    ds, batch = collate_stored_rows(art)  # failed: TypeError: must be real number, not NoneType
    assert "margin" not in ds.column_names
    assert "margin" not in batch and batch["input_ids"].shape == (6, 2)


def write_margin_rows(path, margins: list):
    """TRL preference rows, one per margin (None writes `"margin": null`)."""
    with open(path, "w") as f:
        for i, margin in enumerate(margins):
            f.write(json.dumps({"prompt": [{"role": "user", "content": "Hi?"}],
                                "chosen": [{"role": "assistant", "content": f"Hello {i}."}],
                                "rejected": [{"role": "assistant", "content": "Go away."}], "margin": margin}) + "\n")
    return path


def test_margins_given_on_every_row_are_stored_as_numbers(tmp_path):
    path = write_margin_rows(tmp_path / "p.jsonl", [0.5, 1])

    art = import_dataset(ArtifactStore(tmp_path / "ws"), "preferences", path)

    ds, batch = collate_stored_rows(art)
    assert ds["margin"] == [0.5, 1.0]
    assert batch["margin"].tolist() == [0.5, 1.0]


def test_a_margin_on_some_rows_only_is_an_error(tmp_path):
    path = write_margin_rows(tmp_path / "p.jsonl", [0.5, None])
    store = ArtifactStore(tmp_path / "ws")

    with pytest.raises(RlhfError) as info:
        import_dataset(store, "preferences", path)

    assert str(info.value) == (f"{path}: 1 of 2 rows have a 'margin'; give every row a margin or none "
                               "(a reward trainer needs a number on every row)")
    assert store.list() == []
