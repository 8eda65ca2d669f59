"""Browser sessions that survive a page reload.

A reload opens a fresh Streamlit session with empty state, so after a login the app puts
an opaque session id in the page URL (`?s=...`) and finds the user again from it:

    sid = create_session(store, user)          # after auth.authenticate succeeds
    user = resolve_session(store, sid)         # on every run; None once expired or ended
    end_session(store, sid)                    # logout

The id is 256 random bits and the table keeps only its sha256, as with login tokens, so a
copy of the database lets no one in. The login token itself never goes in a URL. A
session ends after IDLE_TIMEOUT without use, MAX_AGE after login at the latest, or at
logout. The model sits on the store's `Base`, so `LabelStore` creates its table with the
rest of the schema whenever this module is imported first; `ensure_schema` covers a store
opened before that.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import DateTime, ForeignKey, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from labeling_app.store import Base, LabelStore, User, as_utc

IDLE_TIMEOUT = dt.timedelta(hours=12)
MAX_AGE = dt.timedelta(days=7)
# Extending a session is a write; doing it at most this often keeps page reruns read-only.
TOUCH_EVERY = dt.timedelta(minutes=5)


class WebSession(Base):
    """One logged-in browser: the sha256 of its URL session id, and whose it is."""

    __tablename__ = "web_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode("utf-8")).hexdigest()


def _expiry(created_at: dt.datetime, now: dt.datetime) -> dt.datetime:
    return min(now + IDLE_TIMEOUT, created_at + MAX_AGE)


def ensure_schema(store: LabelStore) -> None:
    """Create the sessions table if this store's database lacks it (a no-op otherwise)."""
    store.transaction(lambda s: WebSession.__table__.create(s.connection(), checkfirst=True))


def create_session(store: LabelStore, user: User, now: dt.datetime | None = None) -> str:
    """Start a session for `user`; return its id (for the URL). Expired sessions are purged on the way."""
    now = as_utc(now)
    sid = secrets.token_urlsafe(32)

    def create(s: Session) -> None:
        s.execute(delete(WebSession).where(WebSession.expires_at <= now))
        s.add(WebSession(id_hash=_hash(sid), user_id=user.id, created_at=now, last_seen_at=now,
                         expires_at=_expiry(now, now)))

    store.transaction(create)
    return sid


def resolve_session(store: LabelStore, sid: str | None, now: dt.datetime | None = None) -> User | None:
    """The user of a live session, or None (no such id, expired, ended, or the user was removed)."""
    if not sid:
        return None
    now = as_utc(now)
    key = _hash(sid)
    with store.session() as s:
        row = s.execute(select(WebSession, User).join(User, User.id == WebSession.user_id)
                        .where(WebSession.id_hash == key)).first()
    if row is None:
        return None
    web, user = row
    if web.expires_at <= now:
        end_session(store, sid)
        return None
    if now - web.last_seen_at >= TOUCH_EVERY:
        def touch(s: Session) -> None:
            found = s.get(WebSession, key)
            if found is not None:
                found.last_seen_at, found.expires_at = now, _expiry(found.created_at, now)

        store.transaction(touch)
    return user


def end_session(store: LabelStore, sid: str | None) -> None:
    """Log the session out; an unknown id is fine (logged out in another tab already)."""
    if sid:
        store.transaction(lambda s: s.execute(delete(WebSession).where(WebSession.id_hash == _hash(sid))))
