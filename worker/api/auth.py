"""Accounts of the review service: users, passwords, bearer tokens, browser sessions, CSRF.

* **Passwords** are stored as Argon2id hashes (argon2-cffi's defaults); a user without a
  password is a token-only API client.
* **Bearer tokens** are 32 random bytes shown once (``catalog users token NAME``); only their
  SHA-256 is stored. A random 256-bit secret needs no slow hash: nobody can guess its preimage,
  and a lookup by hash stays one indexed query.
* **Browser sessions** are a signed cookie (HMAC-SHA256 with the service's secret) holding the
  user id, an expiry and the session's CSRF token. The user row is read on every request, so a
  deactivated user or a changed role takes effect at once.
* **CSRF**: every state-changing request that authenticates with the cookie must repeat the
  session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``); a bearer token
  is never sent automatically by a browser, so it needs none.
* **Login rate limit**: a few failures per client address and per user name in a window; more
  are refused without checking the password.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m

ROLES = ("reviewer", "admin")
SESSION_COOKIE = "catalog_session"
SESSION_SECONDS = 12 * 3600

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """A hash verified when the user does not exist, so that a login for an unknown name takes
    as long as one with a wrong password (no user enumeration by timing). Made on first use:
    hashing costs tens of milliseconds and every `catalog` command imports this module."""
    return _hasher.hash(secrets.token_hex(16))


class AuthError(Exception):
    """An account operation was refused; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user, their role, and how they proved it."""

    user_id: int
    name: str
    role: str
    via: str  # "token" | "session"
    csrf: str | None = None  # the session's CSRF token (browser sessions only)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(session: Session, name: str, role: str, password: str | None = None) -> m.ApiUser:
    name = name.strip()
    if not name:
        raise AuthError("a user name is required")
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if password is not None and len(password) < 8:
        raise AuthError("a password needs at least 8 characters")
    if session.execute(select(m.ApiUser.id).where(m.ApiUser.name == name)).scalar() is not None:
        raise AuthError(f"user {name!r} already exists")
    user = m.ApiUser(name=name, role=role, active=True,
                     password_hash=hash_password(password) if password else None)
    session.add(user)
    session.flush()
    return user


def user_by_name(session: Session, name: str) -> m.ApiUser:
    user = session.execute(select(m.ApiUser).where(m.ApiUser.name == name)).scalar_one_or_none()
    if user is None:
        raise AuthError(f"no user {name!r}")
    return user


def issue_token(session: Session, name: str, label: str | None = None) -> str:
    """A new bearer token for user ``name``: returned once, stored only as its hash."""
    user = user_by_name(session, name)
    if not user.active:
        raise AuthError(f"user {name!r} is deactivated")
    token = "cat_" + secrets.token_urlsafe(32)
    session.add(m.ApiToken(user_id=user.id, token_hash=hash_token(token), name=label))
    session.flush()
    return token


def deactivate_user(session: Session, name: str) -> None:
    """Lock a user out at once: no login, and every token of theirs is revoked."""
    user = user_by_name(session, name)
    user.active = False
    now = datetime.now(UTC)
    for token in session.execute(select(m.ApiToken).where(m.ApiToken.user_id == user.id,
                                                          m.ApiToken.revoked_at.is_(None))).scalars():
        token.revoked_at = now
    session.flush()


def authenticate_token(session: Session, token: str) -> Principal | None:
    row = session.execute(
        select(m.ApiToken, m.ApiUser).join(m.ApiUser, m.ApiUser.id == m.ApiToken.user_id)
        .where(m.ApiToken.token_hash == hash_token(token))
    ).one_or_none()
    if row is None:
        return None
    tok, user = row
    if tok.revoked_at is not None or not user.active or user.role not in ROLES:
        return None
    tok.last_used_at = datetime.now(UTC)
    return Principal(user.id, user.name, user.role, "token")


def authenticate_password(session: Session, name: str, password: str) -> m.ApiUser | None:
    user = session.execute(select(m.ApiUser).where(m.ApiUser.name == name)).scalar_one_or_none()
    stored = user.password_hash if user is not None and user.active else None
    try:
        ok = _hasher.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        ok = False
    return user if ok else None


def session_principal(session: Session, user_id: int, csrf: str) -> Principal | None:
    user = session.get(m.ApiUser, user_id)
    if user is None or not user.active or user.role not in ROLES:
        return None
    return Principal(user.id, user.name, user.role, "session", csrf)


# --- signed values (session cookie, login form) --------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: bytes, payload: dict[str, object]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    mac = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    return f"{body}.{mac}"


def unsign(secret: bytes, value: str | None) -> dict[str, object] | None:
    """The payload if the signature holds and it has not expired (``exp``); else None."""
    if not value or value.count(".") != 1:
        return None
    body, mac = value.split(".")
    want = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(mac, want):
        return None
    try:
        payload = json.loads(_unb64(body))
    except ValueError:
        return None
    if not isinstance(payload, dict) or float(payload.get("exp", 0)) < time.time():
        return None
    return payload


def new_session_cookie(secret: bytes, user_id: int) -> tuple[str, str]:
    """(cookie value, CSRF token) of a new browser session."""
    csrf = secrets.token_urlsafe(24)
    return sign(secret, {"uid": user_id, "csrf": csrf, "exp": int(time.time()) + SESSION_SECONDS}), csrf


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class LoginLimiter:
    """At most ``attempts`` failed logins per key (client address, user name) per ``window``
    seconds. In memory, per process: enough for one service process; behind several, the
    limit applies per process."""

    def __init__(self, attempts: int = 5, window: float = 300.0) -> None:
        self.attempts, self.window = attempts, window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self.attempts for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)
