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

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from labeling_app.store import Assignment, Item, LabelStore, TaskSet, User, as_utc
from rlhf.errors import RlhfError

DEFAULT_LEASE_SECONDS = 900


def holds_slot(now: dt.datetime):
    """SQL condition: this assignment counts toward the item's overlap at time `now`."""
    return or_(Assignment.status == "done",
               and_(Assignment.status == "leased", Assignment.lease_expires_at > now))


def slots_taken(s: Session, item_id: int, now: dt.datetime, except_user_id: int | None = None) -> int:
    """How many annotators (other than `except_user_id`) hold a slot of the item now."""
    stmt = select(func.count()).select_from(Assignment).where(Assignment.item_id == item_id, holds_slot(now))
    if except_user_id is not None:
        stmt = stmt.where(Assignment.user_id != except_user_id)
    return s.scalar(stmt)


def lock_user(s: Session, user_id: int) -> None:
    """Serialise one user's concurrent requests.

    Skipped on SQLite, which has no row locks: BEGIN IMMEDIATE already serialises every
    writer there, and the statement would only lengthen the time the write lock is held.
    """
    if s.get_bind().dialect.name != "sqlite":
        s.execute(select(User.id).where(User.id == user_id).with_for_update(key_share=True))


def lock_item(s: Session, item_id: int) -> tuple[Item, TaskSet] | None:
    row = s.execute(select(Item, TaskSet).join(TaskSet, TaskSet.id == Item.task_set_id)
                    .where(Item.id == item_id).with_for_update(of=Item, key_share=True)).first()
    return None if row is None else (row[0], row[1])


def shown_order(item: Item, kind: str, user_id: int) -> list[str]:
    """The annotator's stable random order of the item's responses (A/B: sides as loaded)."""
    ids = item.response_ids
    if kind == "rank":
        # A string seed is hashed with SHA-512 by `random`, so the order is the same in every process.
        random.Random(f"shown-order:{user_id}:{item.id}").shuffle(ids)
    return ids


def _own_lease(s: Session, user: User, task_set_id: int | None, now: dt.datetime, expires: dt.datetime
               ) -> tuple[Item, Assignment] | None:
    """The user's open lease, renewed: refreshing the page must show the same item."""
    stmt = (select(Assignment).join(Item, Item.id == Assignment.item_id)
            .where(Assignment.user_id == user.id, Assignment.status == "leased").order_by(Assignment.id))
    if task_set_id is not None:
        stmt = stmt.where(Item.task_set_id == task_set_id)
    for assignment in s.scalars(stmt).all():
        if assignment.is_live(now):
            item = s.get(Item, assignment.item_id)
        else:
            # Expired: it comes back only if no one took the slot meanwhile (counted under the lock).
            item, task_set = lock_item(s, assignment.item_id)
            if slots_taken(s, item.id, now, except_user_id=user.id) >= task_set.overlap:
                continue
        assignment.lease_expires_at = expires
        return item, assignment
    return None


def _open_items(user: User, task_set_id: int | None, now: dt.datetime):
    """SELECT the first item, with its task set, that the user never had and that has a free slot now."""
    mine = select(Assignment.id).where(Assignment.item_id == Item.id, Assignment.user_id == user.id).exists()
    taken = (select(func.count()).select_from(Assignment)
             .where(Assignment.item_id == Item.id, holds_slot(now)).scalar_subquery())
    stmt = (select(Item, TaskSet).join(TaskSet, TaskSet.id == Item.task_set_id)
            .where(~mine, taken < TaskSet.overlap)
            .order_by(Item.id).limit(1))  # fill items in order, so complete items accumulate early
    return stmt if task_set_id is None else stmt.where(Item.task_set_id == task_set_id)


def _candidate(s: Session, user: User, task_set_id: int | None, now: dt.datetime, passed: list[int],
               skip_locked: bool) -> tuple[Item, TaskSet] | None:
    """Lock the first item the user has never had that looks open (counted again under the lock)."""
    stmt = _open_items(user, task_set_id, now).with_for_update(of=Item, skip_locked=skip_locked, key_share=True)
    if passed:
        stmt = stmt.where(Item.id.not_in(passed))
    row = s.execute(stmt).first()
    return None if row is None else (row[0], row[1])


def next_item(store: LabelStore, user: User, task_set: str | None = None,
              lease_seconds: int = DEFAULT_LEASE_SECONDS, now: dt.datetime | None = None
              ) -> tuple[Item, Assignment] | None:
    """Lease the user's next item (or return the one they hold); None when nothing is left for them.

    `task_set` limits the search to one task set by name; None searches all of them.
    """
    now = as_utc(now)
    expires = now + dt.timedelta(seconds=lease_seconds)
    task_set_id = store.task_set(task_set).id if task_set else None

    def lease(s: Session) -> tuple[Item, Assignment] | None:
        lock_user(s, user.id)
        held = _own_lease(s, user, task_set_id, now, expires)
        if held is not None:
            return held
        passed: list[int] = []
        # First pass over unlocked items only. If that finds nothing, items may merely be
        # locked by annotators being given them right now: wait for those locks rather than
        # wrongly reporting "nothing left".
        for skip_locked in (True, False):
            while (found := _candidate(s, user, task_set_id, now, passed, skip_locked)) is not None:
                item, ts = found
                # The WHERE clause counted slots in the statement's snapshot; recount now
                # that the item is locked, since a lease committed in between may fill it.
                if slots_taken(s, item.id, now) < ts.overlap:
                    assignment = Assignment(item_id=item.id, user_id=user.id, status="leased",
                                            lease_expires_at=expires, shown_order=shown_order(item, ts.kind, user.id),
                                            created_at=now)
                    s.add(assignment)
                    s.flush()
                    return item, assignment
                passed.append(item.id)
        return None

    return store.transaction(lease)


def peek_item(store: LabelStore, user: User, task_set: str | None = None, now: dt.datetime | None = None
              ) -> tuple[Item, list[str]] | None:
    """The item `next_item` would give the user and its shown order, without leasing anything.

    For pages that show an item before the annotator starts on it: looking holds no slot.
    The user's own open lease comes first (a reload shows the same item), then the first
    item with a free slot. `start_item` takes the lease when they begin.
    """
    now = as_utc(now)
    task_set_id = store.task_set(task_set).id if task_set else None
    with store.session() as s:
        stmt = (select(Assignment, Item, TaskSet).join(Item, Item.id == Assignment.item_id)
                .join(TaskSet, TaskSet.id == Item.task_set_id)
                .where(Assignment.user_id == user.id, Assignment.status == "leased").order_by(Assignment.id))
        if task_set_id is not None:
            stmt = stmt.where(Item.task_set_id == task_set_id)
        for assignment, item, ts in s.execute(stmt).all():
            if assignment.is_live(now) or slots_taken(s, item.id, now, except_user_id=user.id) < ts.overlap:
                return item, list(assignment.shown_order)
        row = s.execute(_open_items(user, task_set_id, now)).first()
    return None if row is None else (row[0], shown_order(row[0], row[1].kind, user.id))


def start_item(store: LabelStore, user: User, item_id: int, lease_seconds: int = DEFAULT_LEASE_SECONDS,
               now: dt.datetime | None = None) -> Assignment:
    """Lease this item to the user as they start on it (or renew their lease); raise if it filled meanwhile."""
    now = as_utc(now)
    expires = now + dt.timedelta(seconds=lease_seconds)

    def lease(s: Session) -> Assignment:
        lock_user(s, user.id)
        found = lock_item(s, item_id)
        if found is None:
            raise RlhfError(f"no item {item_id} in the labels database")
        item, ts = found
        assignment = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.user_id == user.id))
        if assignment is not None and assignment.status == "skipped":
            raise RlhfError(f"not assigned: {user.name} skipped item {item_id}")
        if assignment is not None and assignment.status == "done":
            return assignment  # labeled in another tab: `submit` tells a resend from a change
        if (assignment is None or not assignment.is_live(now)) and \
                slots_taken(s, item_id, now, except_user_id=user.id) >= ts.overlap:
            raise RlhfError("other annotators took this item meanwhile; here is the next one")
        if assignment is None:
            assignment = Assignment(item_id=item_id, user_id=user.id, status="leased",
                                    shown_order=shown_order(item, ts.kind, user.id), created_at=now)
            s.add(assignment)
        assignment.lease_expires_at = expires
        s.flush()
        return assignment

    return store.transaction(lease)
