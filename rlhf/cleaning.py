"""Opt-in data cleaning on import; every step counts what it changed or dropped for the manifest.

    --normalize-whitespace   CRLF -> LF, runs of spaces inside a line -> one (indentation kept),
                             no trailing spaces, at most one blank line, trimmed ends
    --drop-empty-turns       drop a row with an empty message instead of failing the import
    --min-tokens/--max-tokens  drop rows outside a length, in tokens of a model's tokenizer,
                             counted over the chat-templated conversation as training sees it
    --dedup exact            drop rows whose conversations repeat an earlier row's exactly
    --dedup near             also drop rows whose character 5-gram Jaccard similarity to an
                             earlier kept row is at least --near-threshold (MinHash + LSH)

Steps run in that order, so with --normalize-whitespace rows that differ only in spacing
are exact duplicates. The first of a set of duplicates is kept.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

from rlhf.errors import RlhfError

# Message-list fields of the import schemas (before and after validation).
MESSAGE_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")
NEAR_THRESHOLD = 0.8


class RowCleaned(ValueError):
    """A row a cleaning step drops; the step has counted it already."""


@dataclass(frozen=True)
class Cleaning:
    normalize_whitespace: bool = False
    drop_empty_turns: bool = False
    dedup: str | None = None  # None | "exact" | "near"
    near_threshold: float | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    tokenizer: str | None = None  # checkpoint ref or tokenizer directory; default base:latest

    def __post_init__(self) -> None:
        if self.dedup not in (None, "exact", "near"):
            raise RlhfError(f"--dedup {self.dedup}: use exact or near")
        if self.near_threshold is not None and self.dedup != "near":
            raise RlhfError("--near-threshold applies to --dedup near; add --dedup near or remove it")
        if self.near_threshold is not None and not 0 < self.near_threshold <= 1:
            raise RlhfError(f"--near-threshold {self.near_threshold}: give a Jaccard similarity in (0, 1], e.g. 0.8")
        for flag, n in (("--min-tokens", self.min_tokens), ("--max-tokens", self.max_tokens)):
            if n is not None and n < 1:
                raise RlhfError(f"{flag} {n}: give a positive number of tokens")
        if self.min_tokens and self.max_tokens and self.min_tokens > self.max_tokens:
            raise RlhfError(f"--min-tokens {self.min_tokens} is above --max-tokens {self.max_tokens}")
        if self.tokenizer and not self.counts_tokens:
            raise RlhfError("--tokenizer is only used by --min-tokens/--max-tokens; add one or remove it")

    @property
    def counts_tokens(self) -> bool:
        return self.min_tokens is not None or self.max_tokens is not None

    @property
    def active(self) -> bool:
        return any(v not in (None, False) for v in asdict(self).values())

    def config(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v not in (None, False)}
        if self.dedup == "near":
            out["near_threshold"] = self.near_threshold or NEAR_THRESHOLD
        if self.counts_tokens:
            out["tokenizer"] = self.tokenizer or "base:latest"
        return out


class Cleaner:
    """Applies a `Cleaning` to rows and keeps the counts: `prepare` per raw row, `filter` on the valid rows."""

    def __init__(self, cleaning: Cleaning, tokenizer=None):
        self.cleaning = cleaning
        self.tokenizer = tokenizer
        self.counts: Counter = Counter()
        for step, key in (("normalize_whitespace", "whitespace_normalized"),
                          ("drop_empty_turns", "empty_turns_dropped")):
            if getattr(cleaning, step):
                self.counts[key] = 0
        if cleaning.min_tokens is not None:
            self.counts["too_short_dropped"] = 0
        if cleaning.max_tokens is not None:
            self.counts["too_long_dropped"] = 0
        if cleaning.dedup:
            self.counts["exact_duplicates_dropped"] = 0
        if cleaning.dedup == "near":
            self.counts["near_duplicates_dropped"] = 0

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        """Per-row steps, before schema validation: whitespace, then empty turns."""
        if self.cleaning.normalize_whitespace:
            cleaned = {k: _map_contents(v, normalize_whitespace) if k in MESSAGE_FIELDS else v for k, v in row.items()}
            if cleaned != row:
                self.counts["whitespace_normalized"] += 1
            row = cleaned
        if self.cleaning.drop_empty_turns and any(
                isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip()
                for k in MESSAGE_FIELDS if isinstance(row.get(k), list) for m in row[k]):
            self.counts["empty_turns_dropped"] += 1
            raise RowCleaned("empty turn")
        return row

    def filter(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Whole-set steps, on validated rows: token length, then exact and near duplicates."""
        c = self.cleaning
        if c.counts_tokens:
            lengths = token_lengths(self.tokenizer, rows)
            keep = []
            for row, n in zip(rows, lengths):
                if c.min_tokens is not None and n < c.min_tokens:
                    self.counts["too_short_dropped"] += 1
                elif c.max_tokens is not None and n > c.max_tokens:
                    self.counts["too_long_dropped"] += 1
                else:
                    keep.append(row)
            rows = keep
        if c.dedup:
            rows, dropped = drop_exact_duplicates(rows)
            self.counts["exact_duplicates_dropped"] += dropped
        if c.dedup == "near":
            rows, dropped = drop_near_duplicates(rows, c.near_threshold or NEAR_THRESHOLD)
            self.counts["near_duplicates_dropped"] += dropped
        return rows


# -- steps (pure) ----------------------------------------------------------------------------


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ").replace("\u200b", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"(?<=\S)[ \t]{2,}", " ", text)  # inside a line; leading indentation (code) is kept
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _map_contents(value: Any, fn: Callable[[str], str]) -> Any:
    if not isinstance(value, list):
        return value
    return [{**m, "content": fn(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), str) else m
            for m in value]


def conversations(row: dict[str, Any]) -> list[list[dict[str, str]]]:
    """The conversations a validated row trains on: prompt + each response, or the prompt alone."""
    responses = [row[k] for k in ("completion", "chosen", "rejected") if row.get(k)]
    return [row["prompt"] + r for r in responses] or [row["prompt"]]


def token_lengths(tokenizer, rows: list[dict[str, Any]]) -> list[int]:
    """Per row, the longest of its conversations in tokens, chat template included when the tokenizer has one."""
    def render(conv):
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(conv, tokenize=False)
        return "\n".join(m["content"] for m in conv)

    convs = [conversations(r) for r in rows]
    flat = [render(c) for cs in convs for c in cs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    lengths, i = [], 0
    for cs in convs:
        lengths.append(max(len(x) for x in ids[i:i + len(cs)]))
        i += len(cs)
    return lengths


def drop_exact_duplicates(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    seen, keep = set(), []
    for row in rows:
        key = json.dumps(conversations(row), sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            keep.append(row)
    return keep, len(rows) - len(keep)


def shingles(text: str, k: int = 5) -> set[str]:
    text = " ".join(text.lower().split())
    return {text[i:i + k] for i in range(max(1, len(text) - k + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def drop_near_duplicates(rows: list[dict[str, Any]], threshold: float, num_perm: int = 128,
                         seed: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Keep a row unless its 5-gram Jaccard similarity to an earlier kept row is >= `threshold`.

    datasketch's MinHash signatures (Broder 1997) in its LSH index (Leskovec et al., "Mining of
    Massive Datasets", ch. 3) find candidate pairs without comparing every pair; each candidate
    is then confirmed with the exact Jaccard similarity, so a drop never rests on an estimate.
    The index's bands are chosen to miss almost no true pair (false negatives weigh 0.99 against
    0.01 for false positives), since a false candidate costs only one exact comparison.
    """
    from datasketch import MinHash, MinHashLSH

    texts = ["\n".join(f"{m['role']}: {m['content']}" for conv in conversations(r) for m in conv) for r in rows]
    sets = [shingles(t) for t in texts]
    index = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.01, 0.99))
    keep, dropped = [], 0
    for i, grams in enumerate(sets):
        signature = MinHash(num_perm=num_perm, seed=seed)
        signature.update_batch([g.encode() for g in grams])
        if any(jaccard(grams, sets[j]) >= threshold for j in sorted(index.query(signature))):
            dropped += 1
            continue
        keep.append(i)
        index.insert(i, signature)
    return [rows[i] for i in keep], dropped
