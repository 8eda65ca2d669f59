"""Login tokens and throttled authentication.

An annotator signs in with a random token printed once by `rlhf label users add`. The
store keeps only its sha256, so a copy of the database does not let anyone sign in, and
nothing here logs or returns a token except `add_user`, once.

Repeated failures from one client (an IP address or a browser session id: the caller's
`client_key`) lock that client out with exponential backoff: the first FREE_FAILURES
wrong tokens are free, the next one locks the client for BASE_LOCKOUT, and each later one
doubles it, up to MAX_LOCKOUT. While locked, every attempt is refused without looking at
the token, even a correct one, and is not counted. A success clears the client's record;
so does a quiet FORGET_AFTER since its last failure.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from labeling_app.store import ROLES, LabelStore, LoginThrottle, User, as_utc
from rlhf.errors import RlhfError

FREE_FAILURES = 5
BASE_LOCKOUT = dt.timedelta(seconds=30)
MAX_LOCKOUT = dt.timedelta(hours=1)
FORGET_AFTER = dt.timedelta(hours=24)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def new_token() -> str:
    """256 random bits, URL-safe: too many to guess, so throttling is defence in depth."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def lockout_for(failures: int) -> dt.timedelta:
    """How long a client is locked out after its `failures`-th consecutive failure."""
    if failures < FREE_FAILURES:
        return dt.timedelta(0)
    doublings = min(failures - FREE_FAILURES, 20)  # bounded: timedelta overflows long before 2**100
    return min(BASE_LOCKOUT * 2 ** doublings, MAX_LOCKOUT)


def add_user(store: LabelStore, name: str, role: str = "annotator", now: dt.datetime | None = None
             ) -> tuple[User, str]:
    """Create a user; return it and its login token, which is not kept and cannot be shown again."""
    if not NAME_RE.match(name):
        raise RlhfError(f"user name {name!r} is not valid; use 1-64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise RlhfError(f"role {role!r} is not valid; expected one of {', '.join(ROLES)}")
    token = new_token()

    def create(s: Session) -> User:
        if s.scalar(select(User.id).where(User.name == name)) is not None:
            raise RlhfError(f"user {name!r} already exists; choose another name")
        user = User(name=name, role=role, token_hash=hash_token(token), created_at=as_utc(now))
        s.add(user)
        s.flush()
        return user

    return store.transaction(create), token


def _client_hash(client_key: str) -> str:
    # Hashed so the table holds no IP addresses, and any key fits the column.
    return hashlib.sha256(client_key.encode("utf-8")).hexdigest()


def authenticate(store: LabelStore, token: str, client_key: str, now: dt.datetime | None = None) -> User | None:
    """The user whose token this is, or None: a wrong token, or a client that is locked out."""
    now = as_utc(now)
    key = _client_hash(client_key)

    def attempt(s: Session) -> User | None:
        throttle = s.scalar(select(LoginThrottle).where(LoginThrottle.client_key_hash == key).with_for_update())
        if throttle is not None and throttle.last_failure_at < now - FORGET_AFTER:
            s.delete(throttle)
            s.flush()
            throttle = None
        if throttle is not None and throttle.locked_until is not None and throttle.locked_until > now:
            return None
        # Looked up by hash: comparing hashes of a guess leaks nothing useful about the real token.
        user = s.scalar(select(User).where(User.token_hash == hash_token(token))) if token else None
        if user is not None:
            if throttle is not None:
                s.delete(throttle)
            return user
        if throttle is None:
            throttle = LoginThrottle(client_key_hash=key, failures=0)
            s.add(throttle)
        throttle.failures += 1
        throttle.last_failure_at = now
        lock = lockout_for(throttle.failures)
        throttle.locked_until = now + lock if lock else None
        return None

    return store.transaction(attempt)


def locked_until(store: LabelStore, client_key: str, now: dt.datetime | None = None) -> dt.datetime | None:
    """When the client's lockout ends (naive UTC), or None if it may try now; for the login page's message."""
    now = as_utc(now)
    with store.session() as s:
        throttle = s.get(LoginThrottle, _client_hash(client_key))
    if throttle is None or throttle.locked_until is None or throttle.locked_until <= now:
        return None
    if throttle.last_failure_at < now - FORGET_AFTER:
        return None
    return throttle.locked_until
