"""Labels out of the store, into versioned datasets that reward training and compare read.

    rankings, preferences = export(artifacts, store, pairs="all", min_annotators=2)
    votes = export_ab(artifacts, store, task_set="ab-candidates-v1-candidates-v2")

- `rankings` (schema "rankings"): every label as submitted, one row per annotator and item.
- `preferences` (schema "preferences", TRL conversational): one row per response pair that
  the item's annotators ordered, aggregated across them (see `aggregate_pairs`).
- `ab_votes` (schema "ab_votes"): blind A/B votes, one row per vote, for `compare`.

Flagged and "none acceptable" labels are left out of the pairs and counted (a label that
is both counts as flagged). Items left with fewer than `min_annotators` usable labels
are skipped and counted. The manifests record those counts, agreement, the task set and
the candidate datasets the items came from, as inputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from statistics import fmean
from typing import Any, Sequence

from labeling_app import agreement
from labeling_app.labels import LabelRecord, Ranking, label_records, rankings_by_item, usable
from labeling_app.store import LabelStore, TaskSet
from rlhf import data, faults
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.errors import RlhfError

PAIR_MODES = ("all", "best-vs-rest")
STAGE = "label export"


# -- the schemas of the datasets this module writes ------------------------------------------


def validate_rankings(row: dict[str, Any]) -> dict[str, Any]:
    """A raw ranking row: {prompt_id, annotator, ranking, flags, rationale, shown_order, submitted_at}."""
    for key in ("prompt_id", "annotator", "rationale", "submitted_at"):
        if not isinstance(row.get(key), str):
            raise data.RowError(f"'{key}' must be a string")
    ranking = row.get("ranking")
    if (not isinstance(ranking, list) or not ranking
            or not all(isinstance(g, list) and g and all(isinstance(r, str) for r in g) for g in ranking)):
        raise data.RowError("'ranking' must be a non-empty list of non-empty lists of response ids")
    ids = [r for g in ranking for r in g]
    if len(set(ids)) != len(ids):
        raise data.RowError("'ranking' lists a response more than once")
    if not isinstance(row.get("shown_order"), list) or sorted(row["shown_order"]) != sorted(ids):
        raise data.RowError("'shown_order' must list exactly the ranked responses")
    flags = row.get("flags")
    if not isinstance(flags, dict) or not isinstance(flags.get("none_acceptable"), bool):
        raise data.RowError("'flags' must be {'flag': reason or null, 'none_acceptable': bool}")
    return row


def validate_ab_votes(row: dict[str, Any]) -> dict[str, Any]:
    """One blind vote: {prompt_id, model_a, model_b, choice, annotator}."""
    for key in ("prompt_id", "model_a", "model_b", "annotator"):
        if not isinstance(row.get(key), str):
            raise data.RowError(f"'{key}' must be a string")
    if row.get("choice") not in ("A", "B", "tie", "both_bad"):
        raise data.RowError("'choice' must be one of A, B, tie, both_bad")
    return row


# The schemas this stage writes. Kept here, not added to rlhf.data.SCHEMAS: those are the
# shapes `rlhf data import` accepts from users, and these are only ever written by export.
# `rlhf.data.load_rows(art, schema="rankings")` needs no registry: it checks the manifest's
# config["schema"], which export sets.
SCHEMAS = {"rankings": validate_rankings, "ab_votes": validate_ab_votes}


# -- rankings to pairs (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class PairVotes:
    """How the annotators of one item ordered one response pair; `chosen` has the majority."""

    chosen: str
    rejected: str
    votes_for: int      # annotators who put chosen above rejected
    votes_against: int  # ... rejected above chosen
    votes_tied: int     # ... tied them

    @property
    def n_annotators(self) -> int:
        return self.votes_for + self.votes_against + self.votes_tied

    @property
    def is_tie(self) -> bool:
        return self.votes_for == self.votes_against

    @property
    def margin(self) -> float:
        """(for - against) / annotators who ranked the pair, in (0, 1] for a non-tie.

        1 when everyone agreed; a split vote or a tie vote lowers it, so reward training
        asks a smaller reward gap of pairs annotators were less sure about (Llama 2's use
        of a margin, Touvron et al. 2023, eq. 2).
        """
        return (self.votes_for - self.votes_against) / self.n_annotators


def _best(rankings: Sequence[Ranking]) -> set[str]:
    """The responses with the lowest mean mid-rank across annotators (several when tied)."""
    ranks = [agreement.midranks(r) for r in rankings]
    mean = {rid: fmean(r[rid] for r in ranks) for rid in ranks[0]}
    low = min(mean.values())
    return {rid for rid, m in mean.items() if m == low}


def aggregate_pairs(rankings: Sequence[Ranking], response_ids: Sequence[str], pairs: str = "all"
                    ) -> list[PairVotes]:
    """Votes per response pair across an item's annotators (ties included; see `PairVotes.is_tie`).

    `pairs="all"`: every pair of responses. `pairs="best-vs-rest"`: the consensus best
    response(s) (lowest mean rank) against each other response.
    """
    if pairs not in PAIR_MODES:
        raise RlhfError(f"pairs={pairs!r} is not valid; expected one of {', '.join(PAIR_MODES)}")
    ranks = [agreement.midranks(r) for r in rankings]
    if pairs == "all":
        candidates = list(combinations(response_ids, 2))
    else:
        best = _best(rankings)
        candidates = [(b, r) for b in response_ids if b in best for r in response_ids if r not in best]
    out = []
    for x, y in candidates:
        above = sum(r[x] < r[y] for r in ranks)
        below = sum(r[x] > r[y] for r in ranks)
        tied = len(ranks) - above - below
        out.append(PairVotes(x, y, above, below, tied) if above >= below else PairVotes(y, x, below, above, tied))
    return out


# -- exports -------------------------------------------------------------------------------


def _candidate_inputs(artifact_store: ArtifactStore, ts: TaskSet) -> list[Artifact]:
    """The candidate datasets the task set was loaded from, checked unchanged since."""
    arts = []
    for source in ts.candidate_refs:
        art = artifact_store.resolve(source["ref"], kind="dataset")
        if art.content_hash != source["content_hash"]:
            raise RlhfError(f"{art.ref} changed since task set {ts.name!r} was loaded from it "
                            f"(hash {art.content_hash[:12]}, loaded {source['content_hash'][:12]}); "
                            f"run `rlhf artifacts verify {art.ref}`")
        arts.append(art)
    return arts


def _ranking_row(r: LabelRecord) -> dict[str, Any]:
    return {"prompt_id": r.prompt_id, "annotator": r.annotator, "ranking": r.ranking,
            "flags": {"flag": r.flag, "none_acceptable": r.none_acceptable}, "rationale": r.rationale,
            "shown_order": r.shown_order, "submitted_at": r.submitted_at.isoformat(timespec="seconds") + "Z",
            "revision": r.revision}


def agreement_metrics(records: Sequence[LabelRecord]) -> dict[str, Any]:
    """Agreement over usable labels, in manifest form (None where undefined)."""
    by_item = rankings_by_item([r for r in records if usable(r)])
    pairwise = agreement.pairwise_agreement(by_item)
    return {"pairwise_agreement": pairwise.rate, "pairwise_comparisons": pairwise.total,
            "krippendorff_alpha": agreement.krippendorff_alpha_ordinal(by_item),
            "agreement_with_consensus": {a: v.rate for a, v in agreement.agreement_with_consensus(by_item).items()}}


def preference_rows(label_store: LabelStore, ts: TaskSet, records: Sequence[LabelRecord], pairs: str,
                    min_annotators: int) -> tuple[list[dict[str, Any]], Counter]:
    """Aggregate each item's usable labels into preference rows; return them and the counts."""
    counts: Counter = Counter(items=0, labels=len(records), pairs=0, ties=0, excluded_flagged=0,
                              excluded_none_acceptable=0, skipped_min_annotators=0, dropped_identical_text=0)
    by_item: dict[int, list[LabelRecord]] = {}
    for r in records:
        by_item.setdefault(r.item_id, []).append(r)
    rows = []
    for item in label_store.items(ts.name):
        counts["items"] += 1
        item_records = by_item.get(item.id, [])
        counts["excluded_flagged"] += sum(r.flag is not None for r in item_records)
        counts["excluded_none_acceptable"] += sum(r.flag is None and r.none_acceptable for r in item_records)
        used = [r for r in item_records if usable(r)]
        if len(used) < max(min_annotators, 1):
            counts["skipped_min_annotators"] += 1
            continue
        responses = {r["response_id"]: r for r in item.responses}
        for votes in aggregate_pairs([r.ranking for r in used], item.response_ids, pairs):
            if votes.is_tie:
                counts["ties"] += 1
                continue
            chosen, rejected = responses[votes.chosen], responses[votes.rejected]
            row = {"prompt": item.prompt,
                   "chosen": [{"role": "assistant", "content": chosen["text"]}],
                   "rejected": [{"role": "assistant", "content": rejected["text"]}],
                   "margin": votes.margin,
                   "source": {"task_set": ts.name, "prompt_id": item.prompt_id, "chosen_id": votes.chosen,
                              "rejected_id": votes.rejected, "chosen_model": chosen["model"],
                              "rejected_model": rejected["model"], "n_annotators": votes.n_annotators,
                              "votes_for": votes.votes_for, "votes_against": votes.votes_against,
                              "votes_tied": votes.votes_tied, "agree": votes.votes_for / votes.n_annotators}}
            try:
                rows.append(data.validate_preferences(row))
            except data.RowDropped:  # two response ids with the same text: no preference to learn
                counts["dropped_identical_text"] += 1
                continue
            counts["pairs"] += 1
    return rows, counts


def export(artifact_store: ArtifactStore, label_store: LabelStore, pairs: str = "all", min_annotators: int = 1,
           task_set: str | None = None) -> tuple[Artifact, Artifact]:
    """Write `preferences` and raw `rankings` datasets from a ranking task set (default: the latest one)."""
    if pairs not in PAIR_MODES:
        raise RlhfError(f"--pairs {pairs} is not valid; expected one of {', '.join(PAIR_MODES)}")
    if min_annotators < 1:
        raise RlhfError(f"--min-annotators must be at least 1, got {min_annotators}")
    ts = label_store.task_set(task_set, kind=None if task_set else "rank")
    if ts.kind != "rank":
        raise RlhfError(f"task set {ts.name!r} is an A/B task set; its votes export with export_ab")
    candidates = _candidate_inputs(artifact_store, ts)
    records = label_records(label_store, ts.name)
    if not records:
        raise RlhfError(f"task set {ts.name!r} has no labels yet; nothing to export")
    rows, counts = preference_rows(label_store, ts, records, pairs, min_annotators)
    if not rows:
        raise RlhfError(f"task set {ts.name!r} gives no preference pair ({dict(counts)}); nothing was written")
    metrics = {**counts, "annotators": len({r.annotator for r in records}), **agreement_metrics(records)}
    faults.point("load")
    config = {"task_set": ts.name, "task_set_kind": ts.kind, "overlap": ts.overlap, "pairs": pairs,
              "min_annotators": min_annotators, "candidates": [c.ref for c in candidates],
              "label_db": label_store.safe_url}

    with artifact_store.create("dataset", "rankings", stage=STAGE, config={"schema": "rankings", **config}) as w:
        data.write_rows(w.path / data.DATA_FILE, [validate_rankings(_ranking_row(r)) for r in records])
        for c in candidates:
            w.add_input("candidates", c)
        w.metrics.update(metrics)
    rankings = w.result
    with artifact_store.create("dataset", "preferences", stage=STAGE,
                               config={"schema": "preferences", "format": "trl", **config}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
        for c in candidates:
            w.add_input("candidates", c)
        w.add_input("rankings", rankings)
        w.metrics.update({"rows": len(rows), **metrics})
    return w.result, rankings


def export_ab(artifact_store: ArtifactStore, label_store: LabelStore, task_set: str | None = None) -> Artifact:
    """Write the `ab_votes` dataset of an A/B task set (default: the latest one). Flagged votes are left out."""
    ts = label_store.task_set(task_set, kind=None if task_set else "ab")
    if ts.kind != "ab":
        raise RlhfError(f"task set {ts.name!r} is a ranking task set; export it with export")
    candidates = _candidate_inputs(artifact_store, ts)
    records = label_records(label_store, ts.name)
    kept = [r for r in records if r.flag is None]
    if not kept:
        raise RlhfError(f"A/B task set {ts.name!r} has no unflagged votes yet; nothing to export")
    rows = [validate_ab_votes({"prompt_id": r.prompt_id, "model_a": r.model_a, "model_b": r.model_b,
                               "choice": r.choice, "annotator": r.annotator}) for r in kept]
    wins: dict[str, Counter] = {}
    for row in rows:
        for side, model in (("A", row["model_a"]), ("B", row["model_b"])):
            outcome = {side: "wins", "tie": "ties", "both_bad": "both_bad"}.get(row["choice"], "losses")
            wins.setdefault(model, Counter())[outcome] += 1
    metrics = {"votes": len(rows), "items": len(label_store.items(ts.name)),
               "choices": dict(Counter(r["choice"] for r in rows)), "excluded_flagged": len(records) - len(kept),
               "annotators": len({r["annotator"] for r in rows}), "by_model": {m: dict(c) for m, c in wins.items()}}
    config = {"schema": "ab_votes", "task_set": ts.name, "task_set_kind": ts.kind, "overlap": ts.overlap,
              "candidates": [c.ref for c in candidates], "label_db": label_store.safe_url}
    with artifact_store.create("dataset", "ab_votes", stage=STAGE, config=config) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
        for c in candidates:
            w.add_input("candidates", c)
        w.metrics.update(metrics)
    return w.result
