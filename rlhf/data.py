"""Dataset schemas, importers and validation.

Rows use TRL's conversational shapes, so stages hand them straight to TRL trainers:

    sft      {"prompt": [messages], "completion": [assistant message]}
             ({"messages": [...]} is accepted on import and split at the last assistant turn)
    prompts  {"prompt_id": str, "prompt": [messages ending with a user turn]}

Importers read JSONL, JSON (a list of rows), Parquet, or a `datasets.save_to_disk`
directory. A bad row fails the import with file, line and reason, and nothing is written;
with `skip_invalid` it is dropped and counted in the manifest instead.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.errors import RlhfError

ROLES = ("system", "user", "assistant")
DATA_FILE = "data.jsonl"
MAX_RECORDED_INVALID = 200


class RowError(ValueError):
    """A row that does not fit its schema; the message says what is wrong."""


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


SCHEMAS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sft": validate_sft,
    "prompts": validate_prompts,
}
UNIQUE_KEYS = {"prompts": "prompt_id"}


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) from a JSONL, JSON, Parquet file or a `save_to_disk` directory."""
    if not path.exists():
        raise RlhfError(f"input file {path} not found; check the path")
    if path.is_dir():
        yield from _read_hf_dir(path)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{n}", RowError(f"not valid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RlhfError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file must hold a list of rows") from None
        if not isinstance(rows, list):
            raise RlhfError(f"{path}: a .json file must hold a list of rows (use .jsonl for one row per line)")
        for n, row in enumerate(rows, 1):
            yield f"{path} row {n}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path} row {n}", row
    else:
        raise RlhfError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or a save_to_disk directory")


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


def validate_file(path: Path, schema: str, skip_invalid: bool) -> tuple[list[dict], list[dict]]:
    """Validate every row; return (rows, invalid). Without `skip_invalid` the first bad row raises."""
    check = SCHEMAS[schema]
    unique = UNIQUE_KEYS.get(schema)
    seen: set[str] = set()
    rows, invalid = [], []
    for where, raw in read_rows(path):
        try:
            if isinstance(raw, RowError):
                raise raw
            if not isinstance(raw, dict):
                raise RowError("a row must be a JSON object")
            row = check(raw)
            if unique:
                if row[unique] in seen:
                    raise RowError(f"duplicate {unique} {row[unique]!r}")
                seen.add(row[unique])
        except RowError as e:
            if not skip_invalid:
                raise RlhfError(f"{where}: {e} (fix the row, or pass --skip-invalid to drop bad rows)") from None
            invalid.append({"where": where, "reason": str(e)})
            continue
        rows.append(row)
    return rows, invalid


def import_dataset(store: ArtifactStore, schema: str, file: str | Path, name: str | None = None,
                   skip_invalid: bool = False) -> Artifact:
    """Validate `file` against `schema` and store it as a new version of dataset `name`."""
    if schema not in SCHEMAS:
        raise RlhfError(f"unknown dataset schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    path = Path(file)
    rows, invalid = validate_file(path, schema, skip_invalid)
    if not rows:
        raise RlhfError(f"{path}: no valid rows to import ({len(invalid)} invalid)")
    config = {"schema": schema, "source": str(path.resolve()), "skip_invalid": skip_invalid}
    with store.create("dataset", name or schema, stage="data import", config=config) as w:
        write_rows(w.path / DATA_FILE, rows)
        w.add_file_input("source", path)
        w.metrics.update({
            "rows": len(rows),
            "dropped": len(invalid),
            "drop_reasons": dict(Counter(i["reason"] for i in invalid)),
            "invalid_rows": invalid[:MAX_RECORDED_INVALID],
        })
    return w.result


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
