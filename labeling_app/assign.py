"""Handing items to annotators: leases with expiry, `overlap` distinct annotators per item.

    got = next_item(store, user, task_set="candidates-v3")
    if got:
        item, assignment = got
        show(item.shown_responses(assignment.shown_order))

Rules:
- An item goes to at most `overlap` distinct annotators. Finished assignments and live
  leases hold a slot; an expired lease frees it, so an item abandoned in an open tab
  returns to the pool.
- An annotator never gets a second assignment for an item they have, had, or skipped
  (UNIQUE(item, user) enforces it in the database too).
- An annotator who holds a lease gets the same item back, with the lease renewed, so a
  page refresh loses nothing. Their own expired lease comes back too while its slot is free.
- Each annotator sees the responses in their own random order, seeded by (user, item) so
  it is the same on every refresh, and recorded on the assignment. A/B items keep the
  side order fixed at load time, which is already random per item.

The calls every annotator makes (`next_item`, `start_item`, and `submit` in labels.py) run
as Core statements built once, below, on a plain connection: the ORM's per-call statement
building, unit of work and identity map cost several times the database's own work here
(bench/label_load.py). A lease commits without waiting for the disk (`durable=False`,
store.py): a lease lost to a power cut only returns its item to the pool.

Concurrency: one transaction per call. It locks the user's row (so one annotator's two
tabs take turns), then the candidate item's row with `FOR UPDATE SKIP LOCKED` on
PostgreSQL, so concurrent annotators pass over an item another is being given instead of
queueing on it, and re-counts the item's slots under that lock. SQLite ignores row locks
and instead serialises writers with `BEGIN IMMEDIATE` (see store.py). A race that slips
through anyway fails on a unique constraint and `LabelStore.transaction` reruns the call.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from sqlalchemy import and_, bindparam, false, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from labeling_app.store import Assignment, Item, LabelStore, TaskSet, User, as_utc
from rlhf.errors import RlhfError

DEFAULT_LEASE_SECONDS = 900
A, I, T = Assignment.__table__, Item.__table__, TaskSet.__table__


def holds_slot(now):
    """SQL condition: this assignment counts toward the item's overlap at time `now` (a value or bindparam)."""
    return or_(A.c.status == "done", and_(A.c.status == "leased", A.c.lease_expires_at > now))


def _in_task_set(stmt, by_task_set: bool):
    return stmt.where(I.c.task_set_id == bindparam("task_set_id")) if by_task_set else stmt


_LOCK_USER = select(User.__table__.c.id).where(User.__table__.c.id == bindparam("user_id")).with_for_update(
    key_share=True)
_ITEM = (select(I, T.c.kind, T.c.overlap).select_from(I.join(T, T.c.id == I.c.task_set_id))
         .where(I.c.id == bindparam("item_id")))
_LOCK_ITEM = _ITEM.with_for_update(of=I, key_share=True)
_SLOTS = {except_user: select(func.count()).select_from(A).where(
              A.c.item_id == bindparam("item_id"), holds_slot(bindparam("now")),
              *([A.c.user_id != bindparam("user_id")] if except_user else []))
          for except_user in (False, True)}
_OWN_LEASES = {by_set: _in_task_set(
                   select(A, I.c.task_set_id).select_from(A.join(I, I.c.id == A.c.item_id))
                   .where(A.c.user_id == bindparam("user_id"), A.c.status == "leased").order_by(A.c.id), by_set)
               for by_set in (False, True)}
_ASSIGNMENT = select(A).where(A.c.item_id == bindparam("item_id"), A.c.user_id == bindparam("user_id"))
_RENEW = update(A).where(A.c.id == bindparam("assignment_id")).values(lease_expires_at=bindparam("expires"))


def _open_items(by_task_set: bool):
    """SELECT the first item, with its task set's kind and overlap, that the user never had and that
    has a free slot at `now`: params user_id, now (and task_set_id)."""
    mine = select(A.c.id).where(A.c.item_id == I.c.id, A.c.user_id == bindparam("user_id")).exists()
    taken = select(func.count()).select_from(A).where(A.c.item_id == I.c.id, holds_slot(bindparam("now")))
    stmt = (select(I, T.c.kind, T.c.overlap).select_from(I.join(T, T.c.id == I.c.task_set_id))
            .where(I.c.complete == false(), ~mine, taken.scalar_subquery() < T.c.overlap)
            .order_by(I.c.id).limit(1))  # fill items in order, so complete items accumulate early
    return _in_task_set(stmt, by_task_set)


_OPEN = {by_set: _open_items(by_set) for by_set in (False, True)}
# Locking variants for next_item, passing over items already found full under the lock.
_CANDIDATE = {(by_set, skip_locked): _OPEN[by_set].where(I.c.id.not_in(bindparam("passed", expanding=True)))
              .with_for_update(of=I, skip_locked=skip_locked, key_share=True)
              for by_set in (False, True) for skip_locked in (False, True)}


def item_of(row: Any) -> Item:
    """A detached Item from a row holding the items columns."""
    return Item(id=row.id, task_set_id=row.task_set_id, prompt_id=row.prompt_id, prompt=row.prompt,
                responses=row.responses, complete=row.complete)


def assignment_of(row: Any, **changes: Any) -> Assignment:
    """A detached Assignment from a row holding the assignments columns, with `changes` applied."""
    fields = {c: getattr(row, c) for c in ("id", "item_id", "user_id", "status", "lease_expires_at",
                                           "shown_order", "created_at")}
    return Assignment(**(fields | changes))


def slots_taken(conn: Connection, item_id: int, now: dt.datetime, except_user_id: int | None = None) -> int:
    """How many annotators (other than `except_user_id`) hold a slot of the item now."""
    return conn.execute(_SLOTS[except_user_id is not None],
                        {"item_id": item_id, "now": now, "user_id": except_user_id}).scalar_one()


def lock_user(conn: Connection, user_id: int) -> None:
    """Serialise one user's concurrent requests.

    Skipped on SQLite, which has no row locks: BEGIN IMMEDIATE already serialises every
    writer there, and the statement would only lengthen the time the write lock is held.
    """
    if conn.dialect.name != "sqlite":
        conn.execute(_LOCK_USER, {"user_id": user_id})


def lock_item(conn: Connection, item_id: int) -> Any | None:
    """Lock the item's row; return it with its task set's kind and overlap (None if there is no such item)."""
    return conn.execute(_LOCK_ITEM, {"item_id": item_id}).first()


def _recount_needed(conn: Connection) -> bool:
    """Must a slot count read in a statement's snapshot be taken again under the item's lock?

    On PostgreSQL, yes: a lease committed since the snapshot may have filled the item. SQLite
    writers run one at a time (BEGIN IMMEDIATE), so the snapshot is already current.
    """
    return conn.dialect.name != "sqlite"


def shown_order(item: Item, kind: str, user_id: int) -> list[str]:
    """The annotator's stable random order of the item's responses (A/B: sides as loaded)."""
    ids = item.response_ids
    if kind == "rank":
        # A string seed is hashed with SHA-512 by `random`, so the order is the same in every process.
        random.Random(f"shown-order:{user_id}:{item.id}").shuffle(ids)
    return ids


def _new_lease(conn: Connection, item: Item, kind: str, user_id: int, now: dt.datetime, expires: dt.datetime
               ) -> Assignment:
    fields = dict(item_id=item.id, user_id=user_id, status="leased", lease_expires_at=expires,
                  shown_order=shown_order(item, kind, user_id), created_at=now)
    assignment_id = conn.execute(insert(A), fields).inserted_primary_key[0]
    return Assignment(id=assignment_id, **fields)


def _own_lease(conn: Connection, user: User, ts_id: int | None, now: dt.datetime, expires: dt.datetime
               ) -> tuple[Item, Assignment] | None:
    """The user's open lease, renewed: refreshing the page must show the same item."""
    for row in conn.execute(_OWN_LEASES[ts_id is not None], {"user_id": user.id, "task_set_id": ts_id}).all():
        live = row.lease_expires_at > now
        # Expired: it comes back only if no one took the slot meanwhile (counted under the lock).
        item_row = conn.execute(_ITEM, {"item_id": row.item_id}).first() if live else lock_item(conn, row.item_id)
        if not live and slots_taken(conn, row.item_id, now, except_user_id=user.id) >= item_row.overlap:
            continue
        conn.execute(_RENEW, {"assignment_id": row.id, "expires": expires})
        return item_of(item_row), assignment_of(row, lease_expires_at=expires)
    return None


def next_item(store: LabelStore, user: User, task_set: str | None = None,
              lease_seconds: int = DEFAULT_LEASE_SECONDS, now: dt.datetime | None = None
              ) -> tuple[Item, Assignment] | None:
    """Lease the user's next item (or return the one they hold); None when nothing is left for them.

    `task_set` limits the search to one task set by name; None searches all of them.
    """
    now = as_utc(now)
    expires = now + dt.timedelta(seconds=lease_seconds)

    def lease(conn: Connection) -> tuple[Item, Assignment] | None:
        ts_id = store.task_set_id(conn, task_set)
        lock_user(conn, user.id)
        held = _own_lease(conn, user, ts_id, now, expires)
        if held is not None:
            return held
        params: dict[str, Any] = {"user_id": user.id, "now": now, "task_set_id": ts_id, "passed": []}
        # First pass over unlocked items only. If that finds nothing, items may merely be
        # locked by annotators being given them right now: wait for those locks rather than
        # wrongly reporting "nothing left".
        for skip_locked in (True, False):
            while (row := conn.execute(_CANDIDATE[ts_id is not None, skip_locked], params).first()) is not None:
                # The WHERE clause counted slots in the statement's snapshot; recount now
                # that the item is locked, since a lease committed in between may fill it.
                if not _recount_needed(conn) or slots_taken(conn, row.id, now) < row.overlap:
                    item = item_of(row)
                    return item, _new_lease(conn, item, row.kind, user.id, now, expires)
                params["passed"] = params["passed"] + [row.id]
        return None

    return store.core_transaction(lease, durable=False)


def peek_item(store: LabelStore, user: User, task_set: str | None = None, now: dt.datetime | None = None
              ) -> tuple[Item, list[str]] | None:
    """The item `next_item` would give the user and its shown order, without leasing anything.

    For pages that show an item before the annotator starts on it: looking holds no slot.
    The user's own open lease comes first (a reload shows the same item), then the first
    item with a free slot. `start_item` takes the lease when they begin.
    """
    now = as_utc(now)
    with store.connection() as conn:
        ts_id = store.task_set_id(conn, task_set)
        params = {"user_id": user.id, "now": now, "task_set_id": ts_id}
        for row in conn.execute(_OWN_LEASES[ts_id is not None], params).all():
            item_row = conn.execute(_ITEM, {"item_id": row.item_id}).first()
            if row.lease_expires_at > now or \
                    slots_taken(conn, row.item_id, now, except_user_id=user.id) < item_row.overlap:
                return item_of(item_row), list(row.shown_order)
        row = conn.execute(_OPEN[ts_id is not None], params).first()
    return None if row is None else (item := item_of(row), shown_order(item, row.kind, user.id))


def start_item(store: LabelStore, user: User, item_id: int, lease_seconds: int = DEFAULT_LEASE_SECONDS,
               now: dt.datetime | None = None) -> Assignment:
    """Lease this item to the user as they start on it (or renew their lease); raise if it filled meanwhile."""
    now = as_utc(now)
    expires = now + dt.timedelta(seconds=lease_seconds)

    def lease(conn: Connection) -> Assignment:
        lock_user(conn, user.id)
        item_row = lock_item(conn, item_id)
        if item_row is None:
            raise RlhfError(f"no item {item_id} in the labels database")
        row = conn.execute(_ASSIGNMENT, {"item_id": item_id, "user_id": user.id}).first()
        if row is not None and row.status == "skipped":
            raise RlhfError(f"not assigned: {user.name} skipped item {item_id}")
        if row is not None and row.status == "done":
            return assignment_of(row)  # labeled in another tab: `submit` tells a resend from a change
        live = row is not None and row.lease_expires_at > now
        if not live and slots_taken(conn, item_id, now, except_user_id=user.id) >= item_row.overlap:
            raise RlhfError("other annotators took this item meanwhile; here is the next one")
        if row is None:
            return _new_lease(conn, item_of(item_row), item_row.kind, user.id, now, expires)
        conn.execute(_RENEW, {"assignment_id": row.id, "expires": expires})
        return assignment_of(row, lease_expires_at=expires)

    return store.core_transaction(lease, durable=False)
