"""The labeling API below the pages: load task sets, submit / revise / skip, progress and admin views.

    ts = load_task_set(store, artifacts, "candidates:v3", overlap=3).task_set
    item, assignment = next_item(store, user, ts.name)              # assign.py
    submit(store, user, item.id, [["r2"], ["r0", "r3"], ["r1"]])    # best first; r0 and r3 tied
    revise(store, user, item.id, [["r0"], ["r2", "r3"], ["r1"]])    # only the latest submission
    skip(store, user, other_item.id)                                 # back to the pool for others

Every write is one transaction (see `LabelStore.transaction`): when `submit` returns, the
label is committed. Errors a user can cause raise `RlhfError` with one line; for an item
that is not theirs the message starts with "not assigned".
"""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from sqlalchemy import and_, bindparam, case, false, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from labeling_app import agreement
from labeling_app.assign import A, I, T, holds_slot, item_of, lock_item, lock_user, slots_taken
from labeling_app.store import AB_CHOICES, Assignment, Item, Label, LabelStore, TaskSet, User, as_utc
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.data import load_rows
from rlhf.errors import RlhfError

Ranking = list[list[str]]
MAX_RATIONALE = 10_000
MAX_FLAG = 500  # a reason for an admin, not a document

# -- task sets ---------------------------------------------------------------------


class LoadedTaskSet(NamedTuple):
    task_set: TaskSet
    items: int
    skipped: dict[str, int]  # reason -> prompts left out


def _candidates(artifact_store: ArtifactStore, ref: str) -> tuple[Artifact, list[dict[str, Any]]]:
    art = artifact_store.resolve(ref, kind="dataset")
    schema = art.manifest.get("config", {}).get("schema")
    if schema != "candidates":
        raise RlhfError(f"{art.ref} is a {schema!r} dataset; labeling needs a candidates dataset "
                        "(made by `rlhf generate`)")
    return art, load_rows(art, schema="candidates")


def _create_task_set(store: LabelStore, name: str, kind: str, overlap: int, sources: list[Artifact],
                     items: list[dict[str, Any]]) -> TaskSet:
    if overlap < 1:
        raise RlhfError(f"overlap must be at least 1, got {overlap}")
    if not name.strip() or len(name) > 128:
        raise RlhfError(f"task set name {name!r} must be 1 to 128 characters")

    def create(s: Session) -> TaskSet:
        if s.scalar(select(TaskSet.id).where(TaskSet.name == name)) is not None:
            raise RlhfError(f"task set {name!r} already exists; pass --name to load under another name")
        ts = TaskSet(name=name, kind=kind, overlap=overlap, created_at=as_utc(None),
                     candidate_refs=[{"ref": a.ref, "content_hash": a.content_hash} for a in sources])
        s.add(ts)
        s.flush()
        s.add_all(Item(task_set_id=ts.id, **item) for item in items)
        return ts

    return store.transaction(create)


def load_task_set(store: LabelStore, artifact_store: ArtifactStore, ref: str, overlap: int = 3,
                  name: str | None = None) -> LoadedTaskSet:
    """Turn a candidates dataset into a ranking task set: one item per prompt with >= 2 responses."""
    art, rows = _candidates(artifact_store, ref)
    items, skipped = [], Counter()
    for row in rows:
        ids = [r["response_id"] for r in row["responses"]]
        if len(set(ids)) != len(ids):
            raise RlhfError(f"{art.ref}: prompt {row['prompt_id']!r} has duplicate response_ids")
        if len(ids) < 2:
            skipped["fewer than 2 responses"] += 1
            continue
        responses = [{"response_id": r["response_id"], "text": r["text"], "model": r.get("model") or art.ref}
                     for r in row["responses"]]
        items.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"], "responses": responses})
    if not items:
        raise RlhfError(f"{art.ref}: no prompt has 2 or more responses to rank")
    ts = _create_task_set(store, name or f"{art.name}-v{art.version}", "rank", overlap, [art], items)
    return LoadedTaskSet(ts, len(items), dict(skipped))


def load_ab_task_set(store: LabelStore, artifact_store: ArtifactStore, ref_a: str, ref_b: str,
                     name: str | None = None, overlap: int = 1, seed: int = 0) -> LoadedTaskSet:
    """A blind A/B task set: each prompt both sets answered, first response of each, sides shuffled.

    The two responses become ids "A" and "B" (the originals are kept as
    `source_response_id`), so nothing an annotator's page handles names a model.
    """
    art_a, rows_a = _candidates(artifact_store, ref_a)
    art_b, rows_b = _candidates(artifact_store, ref_b)
    if art_a.ref == art_b.ref:
        raise RlhfError(f"load-ab needs two different candidate sets, got {art_a.ref} twice")
    name = name or f"ab-{art_a.name}-v{art_a.version}-{art_b.name}-v{art_b.version}"
    by_id_b = {row["prompt_id"]: row for row in rows_b}
    items, skipped = [], Counter()
    for row_a in rows_a:
        row_b = by_id_b.get(row_a["prompt_id"])
        if row_b is None:
            skipped[f"only in {art_a.ref}"] += 1
            continue
        if row_a["prompt"] != row_b["prompt"]:
            raise RlhfError(f"prompt {row_a['prompt_id']!r} differs between {art_a.ref} and {art_b.ref}; "
                            "A/B needs both models answering the same prompts")
        sides = [(art_a, row_a["responses"][0]), (art_b, row_b["responses"][0])]
        # Seeded per item so a reload gives the same sides; random across items so position
        # bias cannot favour one model.
        random.Random(f"ab-sides:{seed}:{name}:{row_a['prompt_id']}").shuffle(sides)
        responses = [{"response_id": side, "text": r["text"], "model": r.get("model") or art.ref,
                      "source_response_id": r["response_id"]} for side, (art, r) in zip("AB", sides)]
        items.append({"prompt_id": row_a["prompt_id"], "prompt": row_a["prompt"], "responses": responses})
    ids_a = {row["prompt_id"] for row in rows_a}
    if only_b := sum(row["prompt_id"] not in ids_a for row in rows_b):
        skipped[f"only in {art_b.ref}"] = only_b
    if not items:
        raise RlhfError(f"{art_a.ref} and {art_b.ref} share no prompt_id; generate both from the same prompts")
    ts = _create_task_set(store, name, "ab", overlap, [art_a, art_b], items)
    return LoadedTaskSet(ts, len(items), dict(skipped))


# -- submitting ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Judgement:
    """What an annotator submits, validated and in canonical form (ids sorted within a tie)."""

    ranking: Ranking
    none_acceptable: bool
    flag: str | None
    rationale: str
    choice: str | None = None

    def matches(self, label: Label) -> bool:
        return (self.ranking, self.none_acceptable, self.flag, self.rationale, self.choice) == (
            label.ranking, label.none_acceptable, label.flag, label.rationale, label.choice)

    def write_to(self, label: Label) -> None:
        label.ranking, label.none_acceptable, label.flag = self.ranking, self.none_acceptable, self.flag
        label.rationale, label.choice = self.rationale, self.choice


def validate_ranking(ranking: Any, response_ids: Sequence[str]) -> Ranking:
    """Check `ranking` partitions exactly `response_ids` into non-empty groups; return it canonical."""
    if not isinstance(ranking, (list, tuple)) or not ranking:
        raise RlhfError("a ranking must be a non-empty list of groups of response ids, best first")
    seen: list[str] = []
    for group in ranking:
        if not isinstance(group, (list, tuple)) or not group or not all(isinstance(r, str) for r in group):
            raise RlhfError("each group of a ranking must be a non-empty list of response ids")
        seen += group
    expected = set(response_ids)
    if dups := sorted(r for r, n in Counter(seen).items() if n > 1):
        raise RlhfError(f"the ranking lists {', '.join(dups)} more than once")
    if unknown := sorted(set(seen) - expected):
        raise RlhfError(f"the ranking names responses this item does not have: {', '.join(unknown)}")
    if missing := sorted(expected - set(seen)):
        raise RlhfError(f"the ranking leaves out {', '.join(missing)}; rank every response (ties allowed)")
    return [sorted(group) for group in ranking]


def _judgement(ranking: Any, none_acceptable: bool, flag: str | None, rationale: str | None,
               item: Item, choice: str | None = None) -> _Judgement:
    if flag is not None and (not isinstance(flag, str) or not flag.strip()):
        raise RlhfError("a flag needs a reason; pass None for no flag")
    if flag is not None and len(flag.strip()) > MAX_FLAG:
        raise RlhfError(f"the flag reason is {len(flag.strip())} characters; keep it under {MAX_FLAG}")
    rationale = (rationale or "").strip()
    if len(rationale) > MAX_RATIONALE:
        raise RlhfError(f"the rationale is {len(rationale)} characters; keep it under {MAX_RATIONALE}")
    return _Judgement(validate_ranking(ranking, item.response_ids), bool(none_acceptable),
                      flag.strip() if flag else None, rationale, choice)


def _ab_judgement(choice: str, flag: str | None, rationale: str | None, item: Item) -> _Judgement:
    """A vote as a ranking of the two sides; "both_bad" is a tie that is also none-acceptable."""
    rankings = {"A": [["A"], ["B"]], "B": [["B"], ["A"]], "tie": [["A", "B"]], "both_bad": [["A", "B"]]}
    if choice not in rankings:
        raise RlhfError(f"choice {choice!r} is not valid; expected one of {', '.join(AB_CHOICES)}")
    return _judgement(rankings[choice], choice == "both_bad", flag, rationale, item, choice)


def _checked_item(s: Session, item_id: int, kind: str) -> tuple[Item, TaskSet]:
    row = s.execute(select(Item, TaskSet).join(TaskSet, TaskSet.id == Item.task_set_id)
                    .where(Item.id == item_id)).first()
    if row is None:
        raise RlhfError(f"no item {item_id} in the labels database")
    item, ts = row
    _check_kind(item_id, ts.kind, ts.name, kind)
    return item, ts


def _check_kind(item_id: int, has: str, task_set: str, wanted: str) -> None:
    if has != wanted:
        use = "submit_ab / revise_ab" if has == "ab" else "submit / revise"
        raise RlhfError(f"item {item_id} belongs to {has} task set {task_set!r}; use {use}")


L = Label.__table__
# Everything `submit` checks, in one statement: the item, its task set, and the user's assignment.
_SUBMIT_STATE = (select(I, T.c.kind, T.c.name.label("task_set_name"), T.c.overlap,
                        A.c.id.label("assignment_id"), A.c.status, A.c.lease_expires_at, A.c.shown_order)
                 .select_from(I.join(T, T.c.id == I.c.task_set_id)
                              .outerjoin(A, and_(A.c.item_id == I.c.id, A.c.user_id == bindparam("user_id"))))
                 .where(I.c.id == bindparam("item_id")))
_LABEL = select(L).where(L.c.item_id == bindparam("item_id"), L.c.user_id == bindparam("user_id"))
_DONE = (update(A).where(A.c.id == bindparam("assignment_id"))
         .values(status="done", lease_expires_at=None))
# The item is complete once `overlap` annotators are done with it (see Item.complete). Only
# the last label writes the item's row, so labels for one item do not queue on its row lock.
_MARK_COMPLETE = (update(I).where(I.c.id == bindparam("item_id"),
                                  select(func.count()).select_from(A)
                                  .where(A.c.item_id == I.c.id, A.c.status == "done").scalar_subquery()
                                  >= bindparam("overlap"))
                  .values(complete=True))


def _submit(store: LabelStore, user: User, item_id: int, kind: str, build: Callable[[Item], _Judgement],
            now: dt.datetime | None) -> Label:
    now = as_utc(now)

    def save(conn: Connection) -> Label:
        lock_user(conn, user.id)
        row = conn.execute(_SUBMIT_STATE, {"item_id": item_id, "user_id": user.id}).first()
        if row is None:
            raise RlhfError(f"no item {item_id} in the labels database")
        _check_kind(item_id, row.kind, row.task_set_name, kind)
        if row.status is None or row.status == "skipped":
            raise RlhfError(f"not assigned: item {item_id} is not assigned to {user.name}")
        if row.status == "leased" and row.lease_expires_at <= now:
            # An expired lease is still honoured while its slot is free, so slow work is not
            # lost. Only this case counts slots, so only it locks the item (as next_item does);
            # a live lease already holds its slot and needs no lock to become a label.
            lock_item(conn, item_id)
            if slots_taken(conn, item_id, now, except_user_id=user.id) >= row.overlap:
                raise RlhfError(f"not assigned: {user.name}'s lease on item {item_id} expired and the item "
                                "went to other annotators")
        item = item_of(row)
        judgement = build(item)
        if row.status == "done":
            existing = Label(**conn.execute(_LABEL, {"item_id": item_id, "user_id": user.id}).one()._mapping)
            if judgement.matches(existing):
                return existing  # a double click or a resent form: nothing to do
            raise RlhfError(f"item {item_id} is already labeled by {user.name}; revise it to change the label")
        label = Label(item_id=item_id, user_id=user.id, shown_order=row.shown_order, submitted_at=now, revision=1,
                      model_a=None, model_b=None)
        judgement.write_to(label)
        if kind == "ab":
            label.model_a, label.model_b = item.responses[0]["model"], item.responses[1]["model"]
        fields = {c.key: getattr(label, c.key) for c in L.columns if c.key != "id"}
        label.id = conn.execute(insert(L), fields).inserted_primary_key[0]
        conn.execute(_DONE, {"assignment_id": row.assignment_id})
        conn.execute(_MARK_COMPLETE, {"item_id": item_id, "overlap": row.overlap})
        return label

    return store.core_transaction(save)


def _revise(store: LabelStore, user: User, item_id: int, kind: str, build: Callable[[Item], _Judgement],
            now: dt.datetime | None) -> Label:
    now = as_utc(now)

    def save(s: Session) -> Label:
        lock_user(s.connection(), user.id)
        latest = s.scalars(select(Label).where(Label.user_id == user.id)
                           .order_by(Label.submitted_at.desc(), Label.id.desc()).limit(1)).first()
        if latest is None or latest.item_id != item_id:
            mine = s.scalar(select(Label.id).where(Label.item_id == item_id, Label.user_id == user.id))
            if mine is None:
                raise RlhfError(f"not assigned: {user.name} has no submission for item {item_id} to revise")
            raise RlhfError(f"only the most recent submission can be revised; {user.name}'s is item "
                            f"{latest.item_id}, not {item_id}")
        item, _ = _checked_item(s, item_id, kind)
        judgement = build(item)
        if judgement.matches(latest):
            return latest
        judgement.write_to(latest)
        latest.revision += 1
        latest.submitted_at = now
        return latest

    return store.transaction(save)


def submit(store: LabelStore, user: User, item_id: int, ranking: Ranking, none_acceptable: bool = False,
           flag: str | None = None, rationale: str = "", now: dt.datetime | None = None) -> Label:
    """Save the user's ranking of an item assigned to them; the same label again is a no-op.

    `ranking`: groups of response ids, best first; ids in one group are tied; every
    response exactly once. `flag`: a reason to flag the item, or None. A different label
    for an item already labeled raises: use `revise`.
    """
    return _submit(store, user, item_id, "rank",
                   lambda item: _judgement(ranking, none_acceptable, flag, rationale, item), now)


def submit_ab(store: LabelStore, user: User, item_id: int, choice: str, flag: str | None = None,
              rationale: str = "", now: dt.datetime | None = None) -> Label:
    """Save the user's A/B vote: "A", "B", "tie" or "both_bad". The label records which model sat on each side."""
    return _submit(store, user, item_id, "ab", lambda item: _ab_judgement(choice, flag, rationale, item), now)


def revise(store: LabelStore, user: User, item_id: int, ranking: Ranking, none_acceptable: bool = False,
           flag: str | None = None, rationale: str = "", now: dt.datetime | None = None) -> Label:
    """Replace the user's most recent submission (which must be for `item_id`) and bump its revision."""
    return _revise(store, user, item_id, "rank",
                   lambda item: _judgement(ranking, none_acceptable, flag, rationale, item), now)


def revise_ab(store: LabelStore, user: User, item_id: int, choice: str, flag: str | None = None,
              rationale: str = "", now: dt.datetime | None = None) -> Label:
    """Replace the user's most recent A/B vote (which must be for `item_id`) and bump its revision."""
    return _revise(store, user, item_id, "ab", lambda item: _ab_judgement(choice, flag, rationale, item), now)


def skip(store: LabelStore, user: User, item_id: int) -> Assignment:
    """Give the item back: it returns to the pool for others, and never comes back to this user."""
    def release(s: Session) -> Assignment:
        lock_user(s.connection(), user.id)
        assignment = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.user_id == user.id))
        if assignment is None:
            raise RlhfError(f"not assigned: item {item_id} is not assigned to {user.name}")
        if assignment.status == "done":
            raise RlhfError(f"item {item_id} is already labeled by {user.name}; it cannot be skipped now")
        assignment.status, assignment.lease_expires_at = "skipped", None
        return assignment

    return store.transaction(release)


def last_label(store: LabelStore, user: User) -> Label | None:
    """The user's most recent submission: the one `revise` may change."""
    with store.session() as s:
        return s.scalars(select(Label).where(Label.user_id == user.id)
                         .order_by(Label.submitted_at.desc(), Label.id.desc()).limit(1)).first()


# -- progress and admin views ----------------------------------------------------------


class Progress(NamedTuple):
    done: int
    assigned: int  # done + leased now + items still open to this user


def progress(store: LabelStore, user: User, task_set: str | None = None, now: dt.datetime | None = None
             ) -> Progress:
    """(done, assigned) for the progress bar. Items are leased one at a time, so "assigned"
    counts what the user has done or holds plus what the pool could still give them; it
    shrinks as other annotators fill items, and done == assigned means nothing is left."""
    now = as_utc(now)
    ts_id = store.task_set(task_set).id if task_set else None

    def in_set(stmt):
        return stmt.where(Item.task_set_id == ts_id) if ts_id else stmt

    mine = (select(func.count()).select_from(Assignment).join(Item, Item.id == Assignment.item_id)
            .where(Assignment.user_id == user.id))
    had = select(Assignment.id).where(Assignment.item_id == Item.id, Assignment.user_id == user.id).exists()
    taken = (select(func.count()).select_from(Assignment)
             .where(Assignment.item_id == Item.id, holds_slot(now)).scalar_subquery())
    with store.session() as s:
        done = s.scalar(in_set(mine.where(Assignment.status == "done")))
        leased = s.scalar(in_set(mine.where(Assignment.status == "leased", Assignment.lease_expires_at > now)))
        open_items = s.scalar(in_set(select(func.count()).select_from(Item)
                                     .join(TaskSet, TaskSet.id == Item.task_set_id)
                                     .where(Item.complete == false(), ~had, taken < TaskSet.overlap)))
    return Progress(done, done + leased + open_items)


@dataclass(frozen=True)
class AnnotatorProgress:
    name: str
    role: str
    done: int
    leased: int  # live leases now
    skipped: int
    flagged: int


@dataclass(frozen=True)
class TaskSetProgress:
    name: str
    kind: str
    overlap: int
    items: int
    labels: int
    complete_items: int  # items with `overlap` labels

    @property
    def needed(self) -> int:
        return self.items * self.overlap


def annotator_progress(store: LabelStore, task_set: str | None = None, now: dt.datetime | None = None
                       ) -> list[AnnotatorProgress]:
    now = as_utc(now)
    ts_id = store.task_set(task_set).id if task_set else None
    def n_where(condition):
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    status_stmt = (select(Assignment.user_id, n_where(Assignment.status == "done"),
                          n_where(and_(Assignment.status == "leased", Assignment.lease_expires_at > now)),
                          n_where(Assignment.status == "skipped"))
                   .join(Item, Item.id == Assignment.item_id).group_by(Assignment.user_id))
    flag_stmt = (select(Label.user_id, func.count()).join(Item, Item.id == Label.item_id)
                 .where(Label.flag.is_not(None)).group_by(Label.user_id))
    if ts_id:
        status_stmt = status_stmt.where(Item.task_set_id == ts_id)
        flag_stmt = flag_stmt.where(Item.task_set_id == ts_id)
    with store.session() as s:
        counts: dict[int, Counter] = defaultdict(Counter)
        for user_id, done, leased, skipped in s.execute(status_stmt):
            counts[user_id].update(done=int(done), leased=int(leased), skipped=int(skipped))
        for user_id, n in s.execute(flag_stmt):
            counts[user_id]["flagged"] = n
        users = s.scalars(select(User).order_by(User.name)).all()
    return [AnnotatorProgress(u.name, u.role, counts[u.id]["done"], counts[u.id]["leased"],
                              counts[u.id]["skipped"], counts[u.id]["flagged"]) for u in users]


def task_set_progress(store: LabelStore) -> list[TaskSetProgress]:
    with store.session() as s:
        per_item = (select(Item.id.label("item_id"), Item.task_set_id, func.count(Label.id).label("n"))
                    .outerjoin(Label, Label.item_id == Item.id).group_by(Item.id, Item.task_set_id).subquery())
        rows = s.execute(select(TaskSet, func.count(per_item.c.item_id), func.coalesce(func.sum(per_item.c.n), 0))
                         .outerjoin(per_item, per_item.c.task_set_id == TaskSet.id)
                         .group_by(TaskSet.id).order_by(TaskSet.id)).all()
        complete = dict(s.execute(select(per_item.c.task_set_id, func.count())
                                  .join(TaskSet, TaskSet.id == per_item.c.task_set_id)
                                  .where(per_item.c.n >= TaskSet.overlap).group_by(per_item.c.task_set_id)).all())
    return [TaskSetProgress(ts.name, ts.kind, ts.overlap, n_items, int(n_labels), complete.get(ts.id, 0))
            for ts, n_items, n_labels in rows]


@dataclass(frozen=True)
class LabelRecord:
    """One label joined with its item and annotator: the shape exports and admin views read."""

    item_id: int
    prompt_id: str
    annotator: str
    ranking: Ranking
    none_acceptable: bool
    flag: str | None
    rationale: str
    shown_order: list[str]
    submitted_at: dt.datetime
    revision: int
    choice: str | None
    model_a: str | None
    model_b: str | None


def label_records(store: LabelStore, task_set: str, flagged_only: bool = False) -> list[LabelRecord]:
    """Every label of a task set, by item then annotator."""
    ts = store.task_set(task_set)
    with store.session() as s:
        stmt = (select(Label, Item.prompt_id, User.name).join(Item, Item.id == Label.item_id)
                .join(User, User.id == Label.user_id).where(Item.task_set_id == ts.id)
                .order_by(Item.id, User.name))
        if flagged_only:
            stmt = stmt.where(Label.flag.is_not(None))
        rows = s.execute(stmt).all()
    return [LabelRecord(lb.item_id, prompt_id, name, lb.ranking, lb.none_acceptable, lb.flag, lb.rationale,
                        lb.shown_order, lb.submitted_at, lb.revision, lb.choice, lb.model_a, lb.model_b)
            for lb, prompt_id, name in rows]


def flagged_items(store: LabelStore, task_set: str) -> list[LabelRecord]:
    """Labels carrying a flag, with the annotator's reason in `flag`: for the admin page only."""
    return label_records(store, task_set, flagged_only=True)


def usable(record: LabelRecord) -> bool:
    """Flagged and none-acceptable labels say the item is broken, not which response is better."""
    return record.flag is None and not record.none_acceptable


def rankings_by_item(records: Sequence[LabelRecord]) -> dict[int, dict[str, Ranking]]:
    """item_id -> {annotator: ranking}: the input of the agreement functions."""
    out: dict[int, dict[str, Ranking]] = defaultdict(dict)
    for r in records:
        out[r.item_id][r.annotator] = r.ranking
    return dict(out)


@dataclass(frozen=True)
class AgreementReport:
    pairwise: agreement.PairwiseAgreement
    krippendorff_alpha: float | None
    with_consensus: dict[str, agreement.PairwiseAgreement]


def agreement_report(store: LabelStore, task_set: str) -> AgreementReport:
    """Agreement over a task set's usable labels (flagged and none-acceptable ones left out)."""
    by_item = rankings_by_item([r for r in label_records(store, task_set) if usable(r)])
    return AgreementReport(agreement.pairwise_agreement(by_item), agreement.krippendorff_alpha_ordinal(by_item),
                           agreement.agreement_with_consensus(by_item))
