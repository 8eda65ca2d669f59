"""Dataset schemas, importers and validation.

Rows use TRL's conversational shapes, so stages hand them straight to TRL trainers:

    sft      {"prompt": [messages], "completion": [assistant message]}
             ({"messages": [...]} is accepted on import and split at the last assistant turn)
    prompts  {"prompt_id": str, "prompt": [messages ending with a user turn]}
    candidates {"prompt_id", "prompt", "responses": [{"response_id", "text", "model", ...}]}
    preferences {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg],
             "margin": float (on every row or on none), "source": {...}}
             (`--format hh` reads Anthropic's "\n\nHuman: ...\n\nAssistant: ..." strings)

Importers read JSONL, JSON (a list of rows), Parquet, or a `datasets.save_to_disk`
directory. A bad row fails the import with file, line and reason, and nothing is written;
with `skip_invalid` it is dropped and counted in the manifest instead.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from rlhf import faults
from rlhf.artifacts import Artifact, ArtifactStore, check_name
from rlhf.cleaning import Cleaner, Cleaning, RowCleaned
from rlhf.errors import RlhfError

ROLES = ("system", "user", "assistant")
DATA_FILE = "data.jsonl"
MAX_RECORDED_INVALID = 200
DEMO_DATA = Path(__file__).parent / "demo_data"
DEMO_PREFIX = "demo:"


class RowError(ValueError):
    """A row that does not fit its schema; the message says what is wrong."""


class RowDropped(ValueError):
    """A well-formed row the schema filters out by rule (e.g. chosen == rejected); always counted."""


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"'{field}' must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value, 1):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RowError(f"'{field}' message {i} must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise RowError(f"'{field}' message {i} has role {msg['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str) or not msg["content"].strip():
            raise RowError(f"'{field}' message {i} ({msg['role']}) has empty or non-text content")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def validate_sft(row: dict[str, Any]) -> dict[str, Any]:
    # Columnar formats (Parquet, save_to_disk) cannot omit a field, so absent reads as None.
    if row.get("messages") is not None:
        msgs = _messages(row["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise RowError("the last message must be from the assistant (it is the training target)")
        if len(msgs) < 2 or all(m["role"] == "system" for m in msgs[:-1]):
            raise RowError("'messages' needs a user turn before the final assistant reply")
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}
    if row.get("prompt") is not None and row.get("completion") is not None:
        prompt = _messages(row["prompt"], "prompt")
        completion = _messages(row["completion"], "completion")
        if len(completion) != 1 or completion[0]["role"] != "assistant":
            raise RowError("'completion' must be exactly one assistant message")
        if prompt[-1]["role"] == "assistant":
            raise RowError("'prompt' must not end with an assistant message")
        return {"prompt": prompt, "completion": completion}
    raise RowError("expected 'messages', or 'prompt' and 'completion'")


def validate_prompts(row: dict[str, Any]) -> dict[str, Any]:
    pid = row.get("prompt_id")
    if not isinstance(pid, str) or not pid.strip():
        raise RowError("'prompt_id' must be a non-empty string")
    prompt = _messages(row.get("prompt"), "prompt")
    if prompt[-1]["role"] != "user":
        raise RowError("'prompt' must end with a user message")
    return {"prompt_id": pid, "prompt": prompt}


def _one_assistant(value: Any, field: str) -> list[dict[str, str]]:
    msgs = _messages(value, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise RowError(f"'{field}' must be exactly one assistant message")
    return msgs


def validate_preferences(row: dict[str, Any]) -> dict[str, Any]:
    """Explicit prompt, or implicit: full conversations that share all but the last turn."""
    if row.get("prompt") is None:
        chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise RowDropped("chosen and rejected differ before the final reply")
        row = {**row, "prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    prompt = _messages(row["prompt"], "prompt")
    if prompt[-1]["role"] != "user":
        raise RowError("'prompt' must end with a user message")
    chosen, rejected = _one_assistant(row.get("chosen"), "chosen"), _one_assistant(row.get("rejected"), "rejected")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise RowDropped("chosen equals rejected")
    margin = row.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise RowError(f"'margin' must be a number, got {margin!r}")
    # No margin means no key: a null margin column breaks plain TRL (its collator makes a tensor of it).
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            **({} if margin is None else {"margin": float(margin)}), "source": row.get("source") or {}}


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(text: Any, field: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...") into chat messages."""
    if not isinstance(text, str):
        raise RowError(f"'{field}' must be an HH transcript string")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f"'{field}' does not start with '\\n\\nHuman:'")
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def from_hh(row: dict[str, Any]) -> dict[str, Any]:
    """An HH row -> a preferences row: keep rows that differ only in the final assistant reply."""
    chosen, rejected = parse_hh(row.get("chosen"), "chosen"), parse_hh(row.get("rejected"), "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RowDropped("the final turn is not an assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise RowDropped("chosen and rejected differ before the final reply")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise RowDropped("empty final reply")
    if any(not t["content"] for t in chosen[:-1]):
        raise RowDropped("an empty earlier turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:], "source": {"format": "hh"}}


def validate_candidates(row: dict[str, Any]) -> dict[str, Any]:
    out = validate_prompts(row)
    responses = row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise RowError("'responses' must be a non-empty list")
    out["responses"] = []
    for i, r in enumerate(responses, 1):
        if not isinstance(r, dict) or not isinstance(r.get("response_id"), str) or not isinstance(r.get("text"), str):
            raise RowError(f"response {i} must have string 'response_id' and 'text'")
        out["responses"].append(r)
    return out


SCHEMAS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sft": validate_sft,
    "prompts": validate_prompts,
    "preferences": validate_preferences,
    "candidates": validate_candidates,
}
# Source formats that are converted to a schema's shape before validation.
FORMATS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"hh": from_hh}
UNIQUE_KEYS = {"prompts": "prompt_id", "candidates": "prompt_id"}


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) from a JSONL, JSON, Parquet file or a `save_to_disk` directory."""
    if not path.exists():
        raise RlhfError(f"input file {path} not found; check the path")
    if path.is_dir():
        yield from _read_hf_dir(path)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")  # a BOM is how some editors mark UTF-8: accept it
        except UnicodeDecodeError as e:
            line = e.object[:e.start].count(b"\n") + 1
            raise RlhfError(f"{path}:{line}: {_not_utf8(e)}") from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RlhfError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file must hold a list of rows") from None
        if not isinstance(rows, list):
            raise RlhfError(f"{path}: a .json file must hold a list of rows (use .jsonl for one row per line)")
        for n, row in enumerate(rows, 1):
            yield f"{path} row {n}", row
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowException as e:
            reason = str(e).removeprefix(f"Could not open Parquet input source '{path}': ").rstrip(".")
            raise RlhfError(f"{path} is not a readable Parquet file ({reason}); check the file, or give it the "
                            "extension of its real format (.jsonl, .json)") from None
        for n, row in enumerate(table.to_pylist(), 1):
            yield f"{path} row {n}", row
    else:
        raise RlhfError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or a save_to_disk directory")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """One row per line; a line that is not UTF-8 or not JSON becomes a RowError for that line."""
    # Bytes, decoded line by line, so one bad byte costs one row (--skip-invalid), not the file.
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a leading BOM marks UTF-8: accept it
            except UnicodeDecodeError as e:
                yield where, RowError(_not_utf8(e))
                continue
            line = line.rstrip("\r\n")  # so an error at the end of the line gets that column, not the next line's
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RowError(f"not valid JSON ({e.msg} at column {e.colno})")


def _not_utf8(e: UnicodeDecodeError) -> str:
    """The bad byte and its column (in characters) on its line; `e.object` is what was decoded, BOM excluded."""
    line_start = e.object.rfind(b"\n", 0, e.start) + 1
    column = len(e.object[line_start:e.start].decode("utf-8")) + 1
    return f"not UTF-8 (byte 0x{e.object[e.start]:02x} at column {column}); save the file as UTF-8"


def _read_hf_dir(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise RlhfError(f"{path} is a directory but not a datasets.save_to_disk dataset") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise RlhfError(f"{path}: dataset has splits {list(ds)}; import one split directory, or add a 'train' split")
        ds = ds["train"]
    for n, row in enumerate(ds, 1):
        yield f"{path} row {n}", row


def validate_file(path: Path, schema: str, skip_invalid: bool, fmt: str | None = None,
                  prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                  ) -> tuple[list[dict], list[dict], Counter]:
    """Validate every row; return (rows, invalid, dropped-by-rule counts).

    Without `skip_invalid` the first malformed row raises. Rows a schema filters out by rule
    (`RowDropped`) are always dropped and counted, never an error. `prepare` (a cleaning step)
    sees each row after format conversion, before validation, and may drop it (`RowCleaned`).
    """
    check = SCHEMAS[schema]
    convert = FORMATS[fmt] if fmt else None
    unique = UNIQUE_KEYS.get(schema)
    seen: set[str] = set()
    rows, invalid, dropped = [], [], Counter()
    for where, raw in read_rows(path):
        try:
            if isinstance(raw, RowError):
                raise raw
            if not isinstance(raw, dict):
                raise RowError("a row must be a JSON object")
            row = convert(raw) if convert else raw
            row = check(prepare(row) if prepare else row)
            if unique:
                if row[unique] in seen:
                    raise RowError(f"duplicate {unique} {row[unique]!r}")
                seen.add(row[unique])
        except RowDropped as e:
            dropped[str(e)] += 1
            continue
        except RowCleaned:  # counted by the cleaning step
            continue
        except RowError as e:
            if not skip_invalid:
                raise RlhfError(f"{where}: {e} (fix the row, or pass --skip-invalid to drop bad rows)") from None
            invalid.append({"where": where, "reason": str(e)})
            continue
        rows.append(row)
    return rows, invalid, dropped


def data_path(file: str | Path) -> Path:
    """`demo:NAME` is a file of the packaged demo data (found through the package, from any
    directory); anything else is a path."""
    if isinstance(file, str) and file.startswith(DEMO_PREFIX):
        path = DEMO_DATA / file.removeprefix(DEMO_PREFIX)
        if not path.is_file():
            files = ", ".join(DEMO_PREFIX + p.name for p in sorted(DEMO_DATA.glob("*.jsonl")))
            raise RlhfError(f"{file}: no such demo file; the packaged demo data is {files}")
        return path
    return Path(file)


def import_dataset(store: ArtifactStore, schema: str, file: str | Path, name: str | None = None,
                   skip_invalid: bool = False, fmt: str | None = None, cleaning: Cleaning | None = None) -> Artifact:
    """Validate `file` against `schema` and store it as a new version of dataset `name`.

    `cleaning` turns on opt-in cleaning steps (rlhf/cleaning.py); each one's count goes in the
    manifest's `cleaning` metrics, and a tokenizer used for length filters is an input.
    """
    if schema not in SCHEMAS:
        raise RlhfError(f"unknown dataset schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    if fmt not in (None, "trl") and fmt not in FORMATS:
        raise RlhfError(f"unknown format {fmt!r}; expected trl or {', '.join(FORMATS)}")
    name = check_name(schema if name is None else name)  # before reading: an empty --name is an error, not the default
    path = data_path(file)
    store.check_writable()
    cleaning = cleaning if cleaning and cleaning.active else None
    tokenizer_art, cleaner = None, None
    if cleaning:
        tokenizer = None
        if cleaning.counts_tokens:
            tokenizer_art, tokenizer = _length_tokenizer(store, cleaning.tokenizer)
        cleaner = Cleaner(cleaning, tokenizer)
    rows, invalid, filtered = validate_file(path, schema, skip_invalid, None if fmt == "trl" else fmt,
                                            prepare=cleaner.prepare if cleaner else None)
    if cleaner:
        rows = cleaner.filter(rows)
    faults.point("load")
    if not rows:
        why = f"{len(invalid)} invalid" + "".join(f", {n} {reason}" for reason, n in filtered.items())
        why += "".join(f", {n} {step}" for step, n in (cleaner.counts.items() if cleaner else ()) if n)
        raise RlhfError(f"{path}: no valid rows to import ({why})")
    with_margin = sum("margin" in r for r in rows)
    if 0 < with_margin < len(rows):
        raise RlhfError(f"{path}: {with_margin} of {len(rows)} rows have a 'margin'; give every row a margin or "
                        "none (a reward trainer needs a number on every row)")
    config = {"schema": schema, "source": str(path.resolve()), "skip_invalid": skip_invalid}
    if schema == "preferences":
        config["format"] = fmt or "trl"
    if cleaning:
        config["cleaning"] = cleaning.config()
    with store.create("dataset", name, stage="data import", config=config) as w:
        write_rows(w.path / DATA_FILE, rows)
        w.add_file_input("source", path)
        if isinstance(tokenizer_art, Artifact):
            w.add_input("tokenizer", tokenizer_art)
        elif tokenizer_art is not None:
            w.add_file_input("tokenizer", tokenizer_art)
        if cleaner:
            w.metrics["cleaning"] = dict(cleaner.counts)
        w.metrics.update({
            "rows": len(rows),
            "filtered": sum(filtered.values()),
            "filter_reasons": dict(filtered),
            "dropped": len(invalid),
            "drop_reasons": dict(Counter(i["reason"] for i in invalid)),
            "invalid_rows": invalid[:MAX_RECORDED_INVALID],
        })
    return w.result


def _length_tokenizer(store: ArtifactStore, source: str | None):
    """(what to record as the input, tokenizer) for length filters: a checkpoint ref, else a tokenizer directory."""
    from transformers import AutoTokenizer

    source = source or "base:latest"
    if Path(source).is_dir():
        return Path(source), AutoTokenizer.from_pretrained(source)
    try:
        art = store.resolve(source, kind="checkpoint")
    except RlhfError as e:
        raise RlhfError(f"--min-tokens/--max-tokens count tokens with --tokenizer {source}, which is neither a "
                        f"directory nor a checkpoint here ({e}); import a base model or pass --tokenizer") from None
    from rlhf.models import load_tokenizer

    return art, load_tokenizer(art)


def write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_rows(artifact: Artifact, schema: str | None = None) -> list[dict]:
    """Read a dataset artifact's rows, checking that it has the schema the caller needs."""
    have = artifact.manifest.get("config", {}).get("schema")
    if schema and have != schema:
        raise RlhfError(f"{artifact.ref} is a {have!r} dataset, but this stage needs a {schema!r} dataset")
    with open(artifact.path / DATA_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_sets(store: ArtifactStore, prompts: Artifact, eval_ref: str | None, eval_fraction: float, seed: int,
                stage: str) -> tuple[list[dict], list[dict], Artifact | None]:
    """Training and held-out prompt rows: every row of `prompts` and those of `eval_ref`, or a
    seeded split of `prompts` that holds out `eval_fraction` of it (at least one row).

    Also returns `eval_ref` resolved (None without it): the version read, for the manifest's lineage.
    """
    import torch

    rows = load_rows(prompts, schema="prompts")
    held_out = store.resolve(eval_ref, kind="dataset") if eval_ref else None
    if held_out:
        held, train_rows = load_rows(held_out, schema="prompts"), rows
    else:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, round(len(rows) * eval_fraction))
        held, train_rows = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
    if not train_rows or not held:
        raise RlhfError(f"{prompts.ref} has {len(rows)} prompts; {stage} needs training prompts and held-out prompts "
                        "(import more, or pass eval_data=<prompts ref>)")
    return train_rows, held, held_out


def split_pairs(dataset: Artifact, rows: list[dict], eval_fraction: float, seed: int, columns: list[str], stage: str):
    """A seeded (train, test) `datasets.DatasetDict` of preference pairs with `columns`.

    Fails when there are fewer than 2 pairs or the fraction leaves no held-out (or no training) pair.
    """
    from datasets import Dataset

    n_eval = round(len(rows) * eval_fraction)
    if len(rows) < 2 or n_eval < 1 or n_eval >= len(rows):
        raise RlhfError(f"{dataset.ref} has {len(rows)} pairs, which leaves {n_eval} held out at "
                        f"train.eval_fraction={eval_fraction}; {stage} needs at least 2 pairs and at least one "
                        "held-out pair (import more pairs or raise train.eval_fraction)")
    return Dataset.from_list([{k: r[k] for k in columns} for r in rows]).train_test_split(test_size=n_eval, seed=seed)


def mix(splits: list, weights: list[float] | None, seed: int, stopping_strategy: str = "all_exhausted"):
    """One train/test `DatasetDict` from several: train parts mixed, test parts pooled.

    With `weights` (relative, any positive numbers) a training example comes from dataset i
    with probability w_i / Σw (`datasets.interleave_datasets`); without, the train parts are
    concatenated. One split is returned as it is.
    """
    from datasets import DatasetDict, concatenate_datasets, interleave_datasets

    if len(splits) == 1:
        return splits[0]
    trains = [s["train"] for s in splits]
    if weights is None:
        train = concatenate_datasets(trains)  # the trainer's sampler shuffles
    else:
        total = sum(weights)
        train = interleave_datasets(trains, probabilities=[w / total for w in weights], seed=seed,
                                    stopping_strategy=stopping_strategy)
    return DatasetDict(train=train, test=concatenate_datasets([s["test"] for s in splits]))
