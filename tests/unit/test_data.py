"""Dataset import: schemas, validation with file:line errors, skip-invalid accounting, file formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rlhf
from rlhf import cli
from rlhf.artifacts import ArtifactStore
from rlhf.data import import_dataset, load_rows, validate_file
from rlhf.errors import RlhfError

DEMO_DATA = Path(rlhf.__file__).parent / "demo_data"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def chat(*turns: str, system: str | None = None) -> dict:
    """A `messages` row from alternating user/assistant texts."""
    messages = [msg("system", system)] if system else []
    messages += [msg("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return {"messages": messages}


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows one per line; a str row is written verbatim (for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def import_error(store: ArtifactStore, schema: str, path: Path, **kwargs) -> str:
    with pytest.raises(RlhfError) as info:
        import_dataset(store, schema, path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def assert_nothing_written(store: ArtifactStore) -> None:
    assert store.list() == []
    assert list(store.root.glob("datasets/*/v*")) == []


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "ws")


GOOD_ROWS = [
    chat("Where is my order?", "It ships tomorrow."),
    chat("Hi", "Hello! How can I help?", "Can I return a lamp?", "Yes, within 30 days.",
         system="You are a support assistant."),
]


# -- sft rows --------------------------------------------------------------------------------------


def test_messages_are_split_at_the_last_assistant_turn(store, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", GOOD_ROWS)

    art = import_dataset(store, "sft", path)

    assert load_rows(art, "sft") == [
        {"prompt": [msg("user", "Where is my order?")],
         "completion": [msg("assistant", "It ships tomorrow.")]},
        {"prompt": [msg("system", "You are a support assistant."), msg("user", "Hi"),
                    msg("assistant", "Hello! How can I help?"), msg("user", "Can I return a lamp?")],
         "completion": [msg("assistant", "Yes, within 30 days.")]},
    ]


def test_prompt_completion_rows_pass_through(store, tmp_path):
    row = {"prompt": [msg("system", "Be brief."), msg("user", "Hi")], "completion": [msg("assistant", "Hello.")]}
    path = write_jsonl(tmp_path / "sft.jsonl", [row])

    assert load_rows(import_dataset(store, "sft", path)) == [row]


def test_extra_message_keys_are_dropped(store, tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi", "name": "bob"}, msg("assistant", "Hello.")]}
    path = write_jsonl(tmp_path / "sft.jsonl", [row])

    assert load_rows(import_dataset(store, "sft", path)) == [
        {"prompt": [msg("user", "Hi")], "completion": [msg("assistant", "Hello.")]}]


def test_import_manifest(store, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", GOOD_ROWS)

    art = import_dataset(store, "sft", path, name="support")

    assert art.ref == "datasets/support:v1"
    assert art.manifest["stage"] == "data import"
    assert art.manifest["config"] == {"schema": "sft", "source": str(path.resolve()), "skip_invalid": False}
    assert art.manifest["metrics"] == {"rows": 2, "filtered": 0, "filter_reasons": {}, "dropped": 0, "drop_reasons": {},
                                       "invalid_rows": []}
    assert list(art.manifest["files"]) == ["data.jsonl"]
    assert art.input("source")["file"] == str(path.resolve())
    assert store.verify(art.ref) == []


def test_dataset_name_defaults_to_the_schema(store, tmp_path):
    art = import_dataset(store, "sft", write_jsonl(tmp_path / "a.jsonl", GOOD_ROWS))

    assert art.ref == "datasets/sft:v1"


# -- bad rows --------------------------------------------------------------------------------------


def test_malformed_row_names_file_line_and_reason_and_writes_nothing(store, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        GOOD_ROWS[0],
        GOOD_ROWS[1],
        chat("Where is my order?"),  # no assistant reply
        GOOD_ROWS[0],
    ])

    message = import_error(store, "sft", path)

    assert message.startswith(f"{path}:3: ")
    assert "the last message must be from the assistant" in message
    assert "--skip-invalid" in message
    assert_nothing_written(store)


def test_line_numbers_count_blank_lines(store, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(GOOD_ROWS[0]) + "\n\n" + "{broken\n")

    assert import_error(store, "sft", path).startswith(f"{path}:3: not valid JSON")


BAD_ROWS = {
    "bad json": ('{"messages": [', "not valid JSON"),
    "wrong role": ({"messages": [msg("user", "Hi"), msg("bot", "Hello")]},
                   "'messages' message 2 has role 'bot'; expected one of system, user, assistant"),
    "empty content": ({"messages": [msg("user", "Hi"), msg("assistant", "  ")]},
                      "'messages' message 2 (assistant) has empty or non-text content"),
    "non-text content": ({"messages": [msg("user", "Hi"), {"role": "assistant", "content": 3}]},
                         "'messages' message 2 (assistant) has empty or non-text content"),
    "last not assistant": ({"messages": [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Bye")]},
                           "the last message must be from the assistant"),
    "no user turn": ({"messages": [msg("system", "Be nice."), msg("assistant", "Hello")]},
                     "'messages' needs a user turn before the final assistant reply"),
    "two completion messages": ({"prompt": [msg("user", "Hi")],
                                 "completion": [msg("assistant", "Hello"), msg("assistant", "again")]},
                                "'completion' must be exactly one assistant message"),
    "prompt ends with assistant": ({"prompt": [msg("user", "Hi"), msg("assistant", "Hm")],
                                    "completion": [msg("assistant", "Hello")]},
                                   "'prompt' must not end with an assistant message"),
    "message not an object": ({"messages": ["Hi", msg("assistant", "Hello")]},
                              "'messages' message 1 must be an object with 'role' and 'content'"),
    "no known keys": ({"text": "Hi"}, "expected 'messages', or 'prompt' and 'completion'"),
    "non-object row": ('["Hi", "Hello"]', "a row must be a JSON object"),
}


@pytest.mark.parametrize("row, reason", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_each_bad_row_gives_its_reason(store, tmp_path, row, reason):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD_ROWS[0], row])

    message = import_error(store, "sft", path)

    assert message.startswith(f"{path}:2: ")
    assert reason in message
    assert_nothing_written(store)


def test_skip_invalid_drops_bad_rows_and_records_them(store, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        GOOD_ROWS[0],
        chat("Only a question"),
        "not json",
        GOOD_ROWS[1],
        chat("Another question"),
    ])

    art = import_dataset(store, "sft", path, skip_invalid=True)

    last = "the last message must be from the assistant (it is the training target)"
    metrics = art.manifest["metrics"]
    assert metrics["rows"] == 2
    assert metrics["dropped"] == 3
    assert metrics["drop_reasons"] == {last: 2, "not valid JSON (Expecting value at column 1)": 1}
    assert metrics["invalid_rows"] == [
        {"where": f"{path}:2", "reason": last},
        {"where": f"{path}:3", "reason": "not valid JSON (Expecting value at column 1)"},
        {"where": f"{path}:5", "reason": last},
    ]
    assert art.manifest["config"]["skip_invalid"] is True
    assert len(load_rows(art)) == 2


def test_skip_invalid_with_no_valid_row_is_an_error(store, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [chat("Only a question")])

    message = import_error(store, "sft", path, skip_invalid=True)

    assert message == f"{path}: no valid rows to import (1 invalid)"
    assert_nothing_written(store)


# -- files and formats -------------------------------------------------------------------------


def expected_rows(store, tmp_path) -> list[dict]:
    return load_rows(import_dataset(store, "sft", write_jsonl(tmp_path / "ref.jsonl", GOOD_ROWS), name="ref"))


def test_json_list_file(store, tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(GOOD_ROWS, indent=2))

    assert load_rows(import_dataset(store, "sft", path)) == expected_rows(store, tmp_path)


def test_json_list_file_names_the_row(store, tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([GOOD_ROWS[0], {"text": "Hi"}]))

    assert import_error(store, "sft", path).startswith(f"{path} row 2: ")


def test_json_file_must_hold_a_list(store, tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(GOOD_ROWS[0]))

    assert "must hold a list of rows" in import_error(store, "sft", path)


def test_parquet_file(store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD_ROWS), path)

    assert load_rows(import_dataset(store, "sft", path)) == expected_rows(store, tmp_path)


def test_save_to_disk_directory(store, tmp_path):
    import datasets

    path = tmp_path / "sft_hf"
    datasets.Dataset.from_list(GOOD_ROWS).save_to_disk(str(path))

    art = import_dataset(store, "sft", path)

    assert load_rows(art) == expected_rows(store, tmp_path)
    assert art.input("source")["file"] == str(path.resolve())


def test_save_to_disk_dataset_dict_uses_train_split(store, tmp_path):
    import datasets

    path = tmp_path / "sft_hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GOOD_ROWS)}).save_to_disk(str(path))

    assert load_rows(import_dataset(store, "sft", path)) == expected_rows(store, tmp_path)


def mixed_shape_columns() -> dict[str, list]:
    """One `messages` row and one `prompt`/`completion` row, as columns: absent fields are null."""
    return {
        "messages": [GOOD_ROWS[0]["messages"], None],
        "prompt": [None, [msg("user", "Can I return a lamp?")]],
        "completion": [None, [msg("assistant", "Yes, within 30 days.")]],
    }


def write_mixed_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = path.with_suffix(".parquet")
    pq.write_table(pa.table(mixed_shape_columns()), path)
    return path


def write_mixed_hf_dir(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_dict(mixed_shape_columns()).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("write", [write_mixed_parquet, write_mixed_hf_dir], ids=["parquet", "save_to_disk"])
def test_columnar_file_with_both_row_shapes(store, tmp_path, write):
    # A columnar format cannot leave a field out: a row of the other shape has it as null.
    path = write(tmp_path / "mixed")

    art = import_dataset(store, "sft", path)

    assert load_rows(art) == [
        {"prompt": [msg("user", "Where is my order?")], "completion": [msg("assistant", "It ships tomorrow.")]},
        {"prompt": [msg("user", "Can I return a lamp?")], "completion": [msg("assistant", "Yes, within 30 days.")]},
    ]


def test_directory_that_is_not_a_dataset(store, tmp_path):
    (tmp_path / "plain").mkdir()

    assert "not a datasets.save_to_disk dataset" in import_error(store, "sft", tmp_path / "plain")


def test_missing_file(store, tmp_path):
    message = import_error(store, "sft", tmp_path / "nope.jsonl")

    assert "not found" in message
    assert "nope.jsonl" in message
    assert_nothing_written(store)


def test_unsupported_extension(store, tmp_path):
    path = tmp_path / "sft.csv"
    path.write_text("prompt,completion\n")

    message = import_error(store, "sft", path)

    assert "unsupported file type '.csv'" in message


def test_empty_file(store, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n")

    assert import_error(store, "sft", path) == f"{path}: no valid rows to import (0 invalid)"
    assert_nothing_written(store)


def test_unknown_schema(store, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", GOOD_ROWS)

    assert "unknown dataset schema 'rankings'" in import_error(store, "rankings", path)


# -- prompts ------------------------------------------------------------------------------------------


def prompt_row(pid, *messages) -> dict:
    return {"prompt_id": pid, "prompt": list(messages)}


def test_prompts_import(store, tmp_path):
    rows = [prompt_row("p1", msg("system", "Be brief."), msg("user", "Hi")),
            prompt_row("p2", msg("user", "Hello"))]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)

    art = import_dataset(store, "prompts", path)

    assert art.ref == "datasets/prompts:v1"
    assert load_rows(art, "prompts") == rows


@pytest.mark.parametrize("row, reason", [
    ({"prompt": [msg("user", "Hi")]}, "'prompt_id' must be a non-empty string"),
    (prompt_row(7, msg("user", "Hi")), "'prompt_id' must be a non-empty string"),
    (prompt_row("p2", msg("user", "Hi"), msg("assistant", "Hello")), "'prompt' must end with a user message"),
    (prompt_row("p1", msg("user", "Hi again")), "duplicate prompt_id 'p1'"),
], ids=["missing id", "non-string id", "ends with assistant", "duplicate id"])
def test_bad_prompt_rows(store, tmp_path, row, reason):
    path = write_jsonl(tmp_path / "prompts.jsonl", [prompt_row("p1", msg("user", "Hi")), row])

    message = import_error(store, "prompts", path)

    assert message.startswith(f"{path}:2: {reason}")
    assert_nothing_written(store)


def test_duplicate_prompt_id_is_dropped_with_skip_invalid(store, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        prompt_row("p1", msg("user", "Hi")), prompt_row("p1", msg("user", "Hi again"))])

    art = import_dataset(store, "prompts", path, skip_invalid=True)

    assert load_rows(art) == [prompt_row("p1", msg("user", "Hi"))]
    assert art.manifest["metrics"]["drop_reasons"] == {"duplicate prompt_id 'p1'": 1}


def test_load_rows_with_the_wrong_schema_names_both(store, tmp_path):
    art = import_dataset(store, "sft", write_jsonl(tmp_path / "sft.jsonl", GOOD_ROWS))

    with pytest.raises(RlhfError) as info:
        load_rows(art, "prompts")

    assert str(info.value) == "datasets/sft:v1 is a 'sft' dataset, but this stage needs a 'prompts' dataset"


# -- encodings, damaged files, names (issue 13, section 5) ----------------------------------------


LATIN1_ROW = b'{"messages": [{"role": "user", "content": "caf\xe9?"}, {"role": "assistant", "content": "Yes."}]}'
LATIN1_COLUMN = LATIN1_ROW.index(b"\xe9") + 1


def test_latin1_byte_in_jsonl_names_file_line_and_not_utf8(store, tmp_path):  # defect 1
    path = tmp_path / "sft.jsonl"
    path.write_bytes(json.dumps(GOOD_ROWS[0]).encode() + b"\n" + LATIN1_ROW + b"\n")

    message = import_error(store, "sft", path)

    assert message == (f"{path}:2: not UTF-8 (byte 0xe9 at column {LATIN1_COLUMN}); save the file as UTF-8 "
                       "(fix the row, or pass --skip-invalid to drop bad rows)")
    assert_nothing_written(store)


def test_skip_invalid_drops_a_line_that_is_not_utf8_and_counts_it(store, tmp_path):  # defect 1
    path = tmp_path / "sft.jsonl"
    good = [json.dumps(r).encode() for r in GOOD_ROWS]
    path.write_bytes(b"\n".join([good[0], LATIN1_ROW, good[1]]) + b"\n")

    art = import_dataset(store, "sft", path, skip_invalid=True)

    reason = f"not UTF-8 (byte 0xe9 at column {LATIN1_COLUMN}); save the file as UTF-8"
    assert load_rows(art) == expected_rows(store, tmp_path)
    assert art.manifest["metrics"]["dropped"] == 1
    assert art.manifest["metrics"]["invalid_rows"] == [{"where": f"{path}:2", "reason": reason}]


def test_binary_file_named_jsonl_is_one_error_line_with_exit_2(tmp_path, capsys):  # defect 1
    import gzip

    ws, path = tmp_path / "ws", tmp_path / "sft.jsonl"
    path.write_bytes(gzip.compress(json.dumps(GOOD_ROWS[0]).encode() * 50))  # gzip opens with 0x1f 0x8b

    for extra in ([], ["--skip-invalid"]):
        rc = cli.main(["--workspace", str(ws), "data", "import", "sft", str(path), *extra])

        out, err = capsys.readouterr()
        assert rc == 2 and out == ""
        assert len(err.splitlines()) == 1, err
        if extra:
            assert err.startswith(f"error: {path}: no valid rows to import (") and " invalid)" in err
        else:
            assert err.startswith(f"error: {path}:1: not UTF-8 (byte 0x8b at column 2)")
    assert ArtifactStore(ws).list() == []


def test_json_list_file_that_is_not_utf8_names_its_line(store, tmp_path):  # defect 1
    path = tmp_path / "sft.json"
    path.write_bytes(b"[\n" + json.dumps(GOOD_ROWS[0]).encode() + b",\n" + LATIN1_ROW + b"\n]\n")

    message = import_error(store, "sft", path)

    assert message == f"{path}:3: not UTF-8 (byte 0xe9 at column {LATIN1_COLUMN}); save the file as UTF-8"
    assert_nothing_written(store)


@pytest.mark.parametrize("content", [b"", b"not parquet at all\n" * 10], ids=["empty", "text"])
def test_file_named_parquet_that_is_not_parquet_is_one_error_line(tmp_path, capsys, content):  # defect 2
    ws, path = tmp_path / "ws", tmp_path / "sft.parquet"
    path.write_bytes(content)

    rc = cli.main(["--workspace", str(ws), "data", "import", "sft", str(path)])

    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path} is not a readable Parquet file (")
    assert "Could not open" not in err  # pyarrow's own prefix, which repeats the path
    assert err.endswith("; check the file, or give it the extension of its real format (.jsonl, .json)\n")
    assert ArtifactStore(ws).list() == []


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_utf8_bom_is_accepted_and_row_1_is_kept(store, tmp_path, suffix, skip_invalid):  # defect 3
    path = tmp_path / f"sft{suffix}"
    text = json.dumps(GOOD_ROWS) if suffix == ".json" else "\n".join(json.dumps(r) for r in GOOD_ROWS)
    path.write_bytes(BOM + text.encode())

    art = import_dataset(store, "sft", path, skip_invalid=skip_invalid)

    assert load_rows(art) == expected_rows(store, tmp_path)
    assert art.manifest["metrics"]["dropped"] == 0


@pytest.mark.parametrize("line, column", [
    ('{"messages": [', len('{"messages": [') + 1),  # the row ends too early: the column past its end
    ('{"messages": x}', len('{"messages": ') + 1),
], ids=["end of line", "mid line"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_invalid_json_error_reports_the_real_column(store, tmp_path, line, column, newline):  # defect 4
    path = tmp_path / "sft.jsonl"
    path.write_bytes((json.dumps(GOOD_ROWS[0]) + newline + line + newline).encode())

    message = import_error(store, "sft", path)

    assert message.startswith(f"{path}:2: not valid JSON (")
    assert f" at column {column})" in message


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_empty_or_invalid_name_is_refused_with_exit_2(tmp_path, capsys, name):  # defect 6
    ws = tmp_path / "ws"
    path = write_jsonl(tmp_path / "sft.jsonl", GOOD_ROWS)

    rc = cli.main(["--workspace", str(ws), "data", "import", "sft", str(path), "--name", name])

    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err == (f"error: artifact name {name!r} is not valid; use letters, digits, '.', '_' and '-', "
                   "starting with a letter or digit\n")
    assert not ws.exists()  # refused before the workspace or the data were touched


def test_base_import_refuses_an_empty_name_before_loading_a_model(tmp_path, capsys):  # defect 6
    rc = cli.main(["--workspace", str(tmp_path / "ws"), "base", "import", str(tmp_path / "no-model"), "--name", ""])

    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("error: artifact name '' is not valid;")


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_bad_file_prints_one_error_line(tmp_path, capsys):
    ws = tmp_path / "ws"
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROWS[0], {"messages": [msg("user", "Hi")]}])

    rc = cli.main(["--workspace", str(ws), "data", "import", "sft", str(bad)])

    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {bad}:2: ")
    assert ArtifactStore(ws).list() == []


def test_cli_import_prints_the_ref(tmp_path, capsys):
    ws = tmp_path / "ws"
    path = write_jsonl(tmp_path / "sft.jsonl", GOOD_ROWS + ["oops"])

    rc = cli.main(["--workspace", str(ws), "data", "import", "sft", str(path), "--skip-invalid"])

    out, err = capsys.readouterr()
    assert rc == 0
    assert err == ""
    assert out == "imported 2 rows -> datasets/sft:v1 (1 invalid rows dropped; see the manifest)\n"


def test_cli_show_unknown_ref_prints_one_error_line(tmp_path, capsys):
    rc = cli.main(["--workspace", str(tmp_path / "ws"), "artifacts", "show", "nope:v9"])

    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("error: no artifact named 'nope'")


# -- shipped demo data -------------------------------------------------------------------------


def user_texts(rows: list[dict]) -> set[str]:
    """Every user message, normalised so that case and spacing cannot hide a leak."""
    return {" ".join(m["content"].lower().split()) for r in rows for m in r["prompt"] if m["role"] == "user"}


def test_demo_data_is_valid_and_held_out_prompts_do_not_leak():
    sft, sft_bad, sft_filtered = validate_file(DEMO_DATA / "support_sft.jsonl", "sft", skip_invalid=True)
    prompts, prompts_bad, _ = validate_file(DEMO_DATA / "support_prompts.jsonl", "prompts", skip_invalid=True)
    heldout, heldout_bad, _ = validate_file(DEMO_DATA / "support_prompts_heldout.jsonl", "prompts",
                                            skip_invalid=True)

    assert (sft_bad, prompts_bad, heldout_bad) == ([], [], [])
    assert not sft_filtered
    assert len(sft) >= 200
    assert len(prompts) >= 1
    assert len(heldout) >= 100
    assert user_texts(heldout) & user_texts(sft) == set()
    assert user_texts(heldout) & user_texts(prompts) == set()
    assert {r["prompt_id"] for r in heldout}.isdisjoint(r["prompt_id"] for r in prompts)


# -- mixing datasets -----------------------------------------------------------------------------


def _split(name: str, n_train: int, n_test: int):
    from datasets import Dataset, DatasetDict

    rows = lambda part, n: Dataset.from_list([{"source": name, "part": part, "i": i} for i in range(n)])
    return DatasetDict(train=rows("train", n_train), test=rows("test", n_test))


def test_mix_samples_training_rows_by_weight_and_uses_every_row():
    from rlhf.data import mix

    mixed = mix([_split("a", 300, 30), _split("b", 30, 3)], [0.75, 0.25], seed=0)

    train = mixed["train"]
    share_b = sum(s == "b" for s in train["source"]) / len(train)
    assert share_b == pytest.approx(0.25, abs=0.05)  # the weight, not b's 9% share of the rows
    # all_exhausted: every row of the larger set appears; the smaller set repeats to keep its share.
    assert {i for s, i in zip(train["source"], train["i"]) if s == "a"} == set(range(300))
    assert len(train) > 330
    # Held-out rows are pooled as they are: no weighting, no repeats, no training rows.
    assert sorted(zip(mixed["test"]["source"], mixed["test"]["i"])) == (
        [("a", i) for i in range(30)] + [("b", i) for i in range(3)])
    assert set(mixed["test"]["part"]) == {"test"}


def test_mix_without_weights_concatenates_and_relative_weights_need_not_sum_to_one():
    from rlhf.data import mix

    plain = mix([_split("a", 10, 2), _split("b", 5, 1)], None, seed=0)
    assert len(plain["train"]) == 15 and len(plain["test"]) == 3
    one, scaled = (mix([_split("a", 50, 2), _split("b", 50, 2)], w, seed=3)["train"] for w in ([0.5, 0.5], [2, 2]))
    assert one["source"] == scaled["source"]


def test_mix_of_one_dataset_is_that_dataset():
    from rlhf.data import mix

    split = _split("a", 10, 2)
    assert mix([split], None, seed=0) is split
