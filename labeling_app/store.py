"""The labeling store: SQLAlchemy models, engine set-up and retrying transactions.

    store = LabelStore.for_workspace(Path("workspace"))          # sqlite:///workspace/labels.db
    store = LabelStore("postgresql+psycopg2://user@host/db")      # the same API on PostgreSQL

SQLite runs in WAL mode (readers never block the one writer) with a busy timeout, and
every write transaction starts with `BEGIN IMMEDIATE`, so writers queue for the database
lock at BEGIN instead of failing half-way with "database is locked". PostgreSQL writers
lock the rows they change (`SELECT ... FOR UPDATE`, see assign.py). On both, unique
constraints are the last line of defence, and `LabelStore.transaction` retries a
transaction that lost a race (unique violation, serialization failure, deadlock, lock timeout).

Times are naive UTC `datetime`s throughout: SQLite has no time zone type, and one
convention on both backends keeps comparisons in SQL simple.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import (JSON, Boolean, CheckConstraint, DateTime, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint, create_engine, event, false, select, text)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from rlhf.errors import RlhfError

SCHEMA_VERSION = 2  # v2: items.complete (see Item)
ROLES = ("annotator", "admin")
TASK_KINDS = ("rank", "ab")
STATUSES = ("leased", "done", "skipped")
AB_CHOICES = ("A", "B", "tie", "both_bad")
T = TypeVar("T")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def as_utc(now: dt.datetime | None) -> dt.datetime:
    """`now` as naive UTC (the store's convention); None means the current time."""
    if now is None:
        return utcnow()
    if now.tzinfo is not None:
        now = now.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return now


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """One row: the schema version this database was created or last migrated to."""

    __tablename__ = "schema_version"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class User(Base):
    """An annotator or admin. Only the sha256 of the login token is kept."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint(f"role IN {ROLES}", name="ck_users_role"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginThrottle(Base):
    """Failed logins per bucket (a browser session, or a token's first characters), stored hashed.

    A wrong token names no user, so failures are counted per bucket: this table is the
    failed-login counter and lockout (see auth.py). The column keeps its first name so
    existing databases need no migration.
    """

    __tablename__ = "login_throttle"
    client_key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[dt.datetime] = mapped_column(DateTime)
    locked_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class TaskSet(Base):
    """A batch of items to label: 'rank' (order K responses) or 'ab' (blind pairwise vote)."""

    __tablename__ = "task_sets"
    __table_args__ = (CheckConstraint(f"kind IN {TASK_KINDS}", name="ck_task_sets_kind"),
                      CheckConstraint("overlap >= 1", name="ck_task_sets_overlap"))
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(8))
    overlap: Mapped[int] = mapped_column(Integer)
    # [{"ref": "datasets/candidates:v3", "content_hash": "..."}]: where the items came from.
    candidate_refs: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Item(Base):
    """One prompt and its responses. For 'ab' items, responses[0] is side A, responses[1] side B.

    `complete` turns true when the item holds `overlap` labels, and never turns back (labels
    are revised in place, never deleted). Finding an open item is then an index scan over the
    incomplete ones instead of a slot count for every item ever finished. It is a hint: the
    slot count stays the rule in every query. On PostgreSQL, an item's last two labels
    committed at the same instant can each miss the other and leave it false, which costs a
    scan step per lookup, never a wrong assignment.
    """

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("task_set_id", "prompt_id", name="uq_items_task_set_prompt"),
                      Index("ix_items_open", "task_set_id", "complete", "id"))
    id: Mapped[int] = mapped_column(primary_key=True)
    task_set_id: Mapped[int] = mapped_column(ForeignKey("task_sets.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[str] = mapped_column(String(256))
    prompt: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    responses: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{"response_id", "text", "model"}]
    complete: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    @property
    def response_ids(self) -> list[str]:
        return [r["response_id"] for r in self.responses]

    def shown_responses(self, shown_order: list[str]) -> list[dict[str, str]]:
        """What an annotator may see, in their order: id and text, never the model."""
        by_id = {r["response_id"]: r for r in self.responses}
        return [{"response_id": rid, "text": by_id[rid]["text"]} for rid in shown_order]


class Assignment(Base):
    """An item leased to (or finished or skipped by) one annotator; at most one per pair."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_assignments_item_user"),
                      CheckConstraint(f"status IN {STATUSES}", name="ck_assignments_status"),
                      Index("ix_assignments_item_status", "item_id", "status"),
                      Index("ix_assignments_user_status", "user_id", "status"))
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(8))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    shown_order: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)

    def is_live(self, now: dt.datetime) -> bool:
        return self.status == "leased" and self.lease_expires_at is not None and self.lease_expires_at > now


class Label(Base):
    """One annotator's judgement of one item; a revision replaces it in place."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_labels_item_user"),
                      CheckConstraint(f"choice IS NULL OR choice IN {AB_CHOICES}", name="ck_labels_choice"),
                      Index("ix_labels_user_submitted", "user_id", "submitted_at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # Groups of response_ids, best group first; responses in one group are tied.
    ranking: Mapped[list[list[str]]] = mapped_column(JSON)
    none_acceptable: Mapped[bool] = mapped_column(Boolean, default=False)
    flag: Mapped[str | None] = mapped_column(Text, nullable=True)  # the reason, when flagged
    rationale: Mapped[str] = mapped_column(Text, default="")
    shown_order: Mapped[list[str]] = mapped_column(JSON)
    # A/B items only: the vote and which model sat on each side when it was cast.
    choice: Mapped[str | None] = mapped_column(String(8), nullable=True)
    model_a: Mapped[str | None] = mapped_column(String(256), nullable=True)
    model_b: Mapped[str | None] = mapped_column(String(256), nullable=True)
    submitted_at: Mapped[dt.datetime] = mapped_column(DateTime)
    revision: Mapped[int] = mapped_column(Integer, default=1)


@contextmanager
def scratch_schema(admin_url: str, prefix: str) -> Iterator[str]:
    """A PostgreSQL URL whose connections live in a fresh schema, dropped with its tables afterwards.

    For tests and load runs that share one database without touching each other's tables.
    Raises `OperationalError` when the server cannot be reached.
    """
    import uuid

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError:
        admin.dispose()
        raise
    try:
        yield f"{admin_url}{'&' if '?' in admin_url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _migrate(conn: Connection, version: int) -> None:
    """Bring a database at schema `version` up to SCHEMA_VERSION, in the caller's transaction."""
    if version < 2:
        # items.complete, filled in from the labels already given.
        conn.execute(text("ALTER TABLE items ADD COLUMN complete BOOLEAN NOT NULL DEFAULT false"))
        conn.execute(text("UPDATE items SET complete = ("
                          "SELECT count(*) FROM assignments a WHERE a.item_id = items.id AND a.status = 'done') >= ("
                          "SELECT t.overlap FROM task_sets t WHERE t.id = items.task_set_id)"))
        next(ix for ix in Item.__table__.indexes if ix.name == "ix_items_open").create(conn)
    conn.execute(SchemaVersion.__table__.update().where(SchemaVersion.id == 1).values(version=SCHEMA_VERSION))


def _retryable(e: DBAPIError) -> bool:
    """Did this transaction lose a race (or its connection) that it would win on a fresh try?"""
    if e.connection_invalidated:
        return True  # SQLAlchemy saw a disconnect and emptied the pool of connections that old
    code = getattr(e.orig, "pgcode", None)
    if code is not None:
        # unique violation, serialization failure, deadlock, lock not available
        return code in ("23505", "40001", "40P01", "55P03")
    message = str(e.orig).lower()
    return "unique constraint failed" in message or "database is locked" in message or "busy" in message


class LabelStore:
    """A connection to the labels database; the schema is created (or checked) on start."""

    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 50):
        self.url = url
        try:
            # No pre-ping: it would cost a round trip per checkout. A connection that died under
            # the pool (a database server restart) fails its first statement instead, and
            # `transaction` reruns the call on a fresh one.
            self.engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        except (ArgumentError, NoSuchModuleError) as e:
            raise RlhfError(f"{url!r} is not a usable database URL ({e}); write e.g. sqlite:///labels.db "
                            "or postgresql+psycopg2://user@host/db") from None
        self.dialect = self.engine.dialect.name
        self._task_set_ids: dict[str, int] = {}
        self._sqlite_writer = threading.Lock()
        if self.dialect == "sqlite":
            self._configure_sqlite()
        try:
            self._create_schema()
        except OperationalError as e:
            self.engine.dispose()
            raise RlhfError(f"cannot open the labels database {self.safe_url}: {' '.join(str(e.orig).split())}") from None

    @classmethod
    def for_workspace(cls, workspace_root: Path, url: str | None = None) -> LabelStore:
        """`url`, else $RLHF_LABEL_DB, else SQLite at `<workspace>/labels.db`."""
        url = url or os.environ.get("RLHF_LABEL_DB")
        if not url:
            root = Path(workspace_root).expanduser().absolute()
            root.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{root / 'labels.db'}"
        return cls(url)

    @property
    def safe_url(self) -> str:
        """The URL with any password masked, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # -- engine set-up -----------------------------------------------------------

    def _configure_sqlite(self) -> None:
        path = self.engine.url.database
        if path and path != ":memory:" and not path.startswith("file:"):
            # Labels and token hashes are nobody else's business: create the file 0600 before
            # SQLite does (it would use the umask, typically 0644). SQLite gives the -wal and
            # -shm files the database file's permissions.
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except OSError:
                pass  # it exists (its mode is the owner's choice), or SQLite's own error says why below
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # Take BEGIN away from the sqlite3 driver, whose legacy mode skips it before
            # SELECTs; the "begin" hook below emits it (SQLAlchemy docs, "Transactions with
            # SQLite and the sqlite3 driver").
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            # FULL: a commit is on disk, not only in the OS cache, before the page says "saved".
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn):
            # IMMEDIATE takes the write lock now, so a read-then-write transaction cannot
            # find the database changed under it and fail at its first write.
            options = conn.get_execution_options()
            if options.get("rlhf_write", False):
                # Set for every write, so a connection back from the pool is durable by default.
                durable = options.get("rlhf_durable", True)
                conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("BEGIN")

    def _create_schema(self) -> None:
        with self.engine.connect().execution_options(rlhf_write=True) as conn, conn.begin():
            if self.dialect == "postgresql":
                # Two processes starting at once must not both CREATE TABLE (or both migrate).
                conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
            Base.metadata.create_all(conn)
            row = conn.execute(select(SchemaVersion.version).where(SchemaVersion.id == 1)).scalar()
            if row is None:
                conn.execute(SchemaVersion.__table__.insert().values(id=1, version=SCHEMA_VERSION))
            elif row > SCHEMA_VERSION:
                raise RlhfError(f"the labels database {self.safe_url} has schema v{row}, newer than this "
                                f"rlhf-suite understands (v{SCHEMA_VERSION}); upgrade rlhf-suite")
            elif row < SCHEMA_VERSION:
                _migrate(conn, row)

    # -- transactions ------------------------------------------------------------

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """A session in one transaction, committed on clean exit. Objects stay readable afterwards."""
        with self._writer_turn(write), Session(self.engine, expire_on_commit=False) as s:
            s.connection(execution_options={"rlhf_write": write})
            yield s
            s.commit()

    @contextmanager
    def connection(self, write: bool = False, durable: bool = True) -> Iterator[Connection]:
        """A Core connection in one transaction, committed on clean exit: for the hot paths.

        `durable=False` is for writes that may be lost to a power cut (not to a crash of the
        server process) without harm, such as a lease: the commit skips the flush to disk
        that a label's commit waits for (SQLite `synchronous=NORMAL` in WAL mode, PostgreSQL
        `synchronous_commit=off`; neither risks corruption).
        """
        options = {"rlhf_write": write, "rlhf_durable": durable}
        with self._writer_turn(write), self.engine.connect().execution_options(**options) as conn, conn.begin():
            if write and not durable and self.dialect == "postgresql":
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            yield conn

    @contextmanager
    def _writer_turn(self, write: bool) -> Iterator[None]:
        """SQLite writers of this process queue on a lock instead of in SQLite's busy handler.

        A writer blocked in the busy handler sleeps and polls (up to 100 ms a nap), so under
        load the wait grows far beyond the lock holder's few milliseconds. Writers from
        other processes still meet at BEGIN IMMEDIATE and the busy timeout.
        """
        if write and self.dialect == "sqlite":
            with self._sqlite_writer:
                yield
        else:
            yield

    def transaction(self, fn: Callable[[Session], T], write: bool = True, attempts: int = 10) -> T:
        """Run `fn(session)` in one transaction; rerun it from scratch if it lost a race.

        `fn` must do all its reading inside the transaction, so a rerun sees the winner's
        writes. `RlhfError`s and other errors propagate after a rollback.
        """
        return self._retrying(lambda: self.session(write), fn, attempts)

    def core_transaction(self, fn: Callable[[Connection], T], write: bool = True, durable: bool = True,
                         attempts: int = 10) -> T:
        """`transaction` on a Core connection (see `connection`), for the calls every annotator makes."""
        return self._retrying(lambda: self.connection(write, durable), fn, attempts)

    @staticmethod
    def _retrying(open_transaction: Callable[[], Any], fn: Callable[[Any], T], attempts: int) -> T:
        for attempt in range(attempts):
            try:
                with open_transaction() as handle:
                    return fn(handle)
            except DBAPIError as e:
                if attempt == attempts - 1 or not _retryable(e):
                    raise
                # Jittered exponential backoff so racing writers do not collide again in step.
                time.sleep(random.uniform(0, 0.005 * 2 ** attempt))
        raise AssertionError("unreachable")

    # -- simple reads ------------------------------------------------------------

    def user(self, name: str) -> User:
        with self.session() as s:
            user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise RlhfError(f"no user named {name!r}; add one with `rlhf label users add {name}`")
        return user

    def users(self) -> list[User]:
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.name)))

    def task_set(self, name: str | None = None, kind: str | None = None) -> TaskSet:
        """The task set called `name`, or the most recently loaded one (of `kind`, if given)."""
        with self.session() as s:
            stmt = select(TaskSet).order_by(TaskSet.id.desc())
            if kind:
                stmt = stmt.where(TaskSet.kind == kind)
            if name:
                stmt = stmt.where(TaskSet.name == name)
            found = s.scalars(stmt.limit(1)).first()
            if found is None:
                what = f"task set {name!r}" if name else f"{kind} task set" if kind else "task set"
                raise self._no_task_set(s.connection(), what)
        return found

    def task_set_id(self, conn: Connection, name: str | None) -> int | None:
        """The id of task set `name` (None for None), read in the caller's transaction.

        Task sets are never renamed or deleted, so an id once found is kept for the store's
        life: the calls every annotator makes skip a round trip.
        """
        if name is None:
            return None
        if name not in self._task_set_ids:
            found = conn.execute(select(TaskSet.id).where(TaskSet.name == name)).scalar()
            if found is None:
                raise self._no_task_set(conn, f"task set {name!r}")
            self._task_set_ids[name] = found
        return self._task_set_ids[name]

    def _no_task_set(self, conn: Connection, what: str) -> RlhfError:
        """The error for a task set that is not there, listing the ones that are."""
        have = ", ".join(conn.execute(select(TaskSet.name).order_by(TaskSet.id)).scalars()) or \
            "none; load one with `rlhf label load candidates:vK`"
        return RlhfError(f"no {what} in {self.safe_url} (task sets: {have})")

    def task_sets(self) -> list[TaskSet]:
        with self.session() as s:
            return list(s.scalars(select(TaskSet).order_by(TaskSet.id)))

    def item(self, item_id: int) -> Item:
        with self.session() as s:
            item = s.get(Item, item_id)
        if item is None:
            raise RlhfError(f"no item {item_id} in the labels database")
        return item

    def items(self, task_set: str) -> list[Item]:
        ts = self.task_set(task_set)
        with self.session() as s:
            return list(s.scalars(select(Item).where(Item.task_set_id == ts.id).order_by(Item.id)))
