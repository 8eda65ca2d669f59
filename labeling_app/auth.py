"""Login tokens and throttled authentication.

An annotator signs in with a random token printed once by `rlhf label users add`. The
store keeps only its sha256, so a copy of the database does not let anyone sign in, and
nothing here logs or returns a token except `add_user`, once.

Failed logins are counted per *bucket*, two for each attempt: the browser session that
tried (the caller's `client_key`) and the first PREFIX_CHARS characters of the token that
was tried. An IP address is never a bucket: behind a NAT or a reverse proxy a whole team
shares one, and one guesser would lock everyone out. A bucket's first FREE_FAILURES - 1
consecutive failures are free, the FREE_FAILURES-th locks it for BASE_LOCKOUT, and each
later one doubles that, up to MAX_LOCKOUT. An attempt in a locked bucket is refused
without looking at the token and is not counted.

So a guesser slows only itself: a new browser session starts a fresh session bucket, but
the prefix bucket catches repeated tries at one known token beginning (a token partly
seen or leaked). Another annotator's correct token shares neither bucket (its prefix
collides with a guess with probability 64**-PREFIX_CHARS) and is never refused. A success
clears only its own session's record, never another client's count; a quiet FORGET_AFTER
since a bucket's last failure clears it too.
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

FREE_FAILURES = 5  # the 5th consecutive failure of a bucket locks it
PREFIX_CHARS = 8
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


def _bucket_hash(bucket: str) -> str:
    # Hashed so the table holds no session ids or token beginnings, and any key fits the column.
    return hashlib.sha256(bucket.encode("utf-8")).hexdigest()


def _buckets(token: str, client_key: str) -> tuple[str, str]:
    return _bucket_hash(f"session:{client_key}"), _bucket_hash(f"prefix:{token[:PREFIX_CHARS]}")


def authenticate(store: LabelStore, token: str, client_key: str, now: dt.datetime | None = None) -> User | None:
    """The user whose token this is, or None: a wrong token, or a locked session or token prefix."""
    now = as_utc(now)
    session_key, prefix_key = _buckets(token, client_key)

    def attempt(s: Session) -> User | None:
        # Locked in key order, so two attempts sharing both buckets cannot deadlock.
        throttles = {t.client_key_hash: t for t in s.scalars(
            select(LoginThrottle).where(LoginThrottle.client_key_hash.in_(sorted({session_key, prefix_key})))
            .order_by(LoginThrottle.client_key_hash).with_for_update())}
        for key, throttle in list(throttles.items()):
            if throttle.last_failure_at < now - FORGET_AFTER:
                s.delete(throttle)
                del throttles[key]
        s.flush()
        if any(t.locked_until is not None and t.locked_until > now for t in throttles.values()):
            return None
        # Looked up by hash: comparing hashes of a guess leaks nothing useful about the real token.
        user = s.scalar(select(User).where(User.token_hash == hash_token(token))) if token else None
        if user is not None:
            if session_key in throttles:
                s.delete(throttles[session_key])
            return user
        for key in {session_key, prefix_key}:
            throttle = throttles.get(key)
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
    """When this browser session's lockout ends (naive UTC), or None if it may try now; for the login page."""
    now = as_utc(now)
    with store.session() as s:
        throttle = s.get(LoginThrottle, _bucket_hash(f"session:{client_key}"))
    if throttle is None or throttle.locked_until is None or throttle.locked_until <= now:
        return None
    if throttle.last_failure_at < now - FORGET_AFTER:
        return None
    return throttle.locked_until
