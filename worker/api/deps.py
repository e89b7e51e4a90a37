"""Request dependencies: the service's state, the caller, roles, CSRF, pagination."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from sqlalchemy.orm import Session

from db.session import transaction
from worker.api import auth
from worker.config import Settings

#: Largest page any list endpoint returns; a bigger ``page_size`` is refused (422).
MAX_PAGE_SIZE = 100
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class ServiceState:
    settings: Settings
    secret: bytes
    secure_cookies: bool | None  # None: Secure exactly when the request came over https
    limiter: auth.LoginLimiter = field(default_factory=auth.LoginLimiter)

    @property
    def url(self) -> str:
        return self.settings.effective_database_url


def state(request: Request) -> ServiceState:
    service: ServiceState = request.app.state.service
    return service


def tx(request: Request) -> contextlib.AbstractContextManager[Session]:
    """A transaction for the handler to open itself: committed before the response is built,
    so a client never sees a success whose commit has not happened (a ``yield`` dependency's
    exit may run after the response is sent)."""
    return transaction(state(request).url)


class NotLoggedIn(Exception):
    """A browser page was asked for without a session: the page handler redirects to login."""


async def _csrf_given(request: Request) -> str | None:
    header = request.headers.get("x-csrf-token")
    if header:
        return header
    if request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get("csrf_token")
        return value if isinstance(value, str) else None
    return None


async def principal(request: Request) -> auth.Principal:
    """The authenticated caller (bearer token, else the session cookie); 401 otherwise.

    A cookie-authenticated request that changes state must carry the session's CSRF token."""
    service = state(request)
    header = request.headers.get("authorization", "")
    found: auth.Principal | None = None
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            with transaction(service.url) as session:
                found = auth.authenticate_token(session, token.strip())
    else:
        payload = auth.unsign(service.secret, request.cookies.get(auth.SESSION_COOKIE))
        if payload is not None:
            with transaction(service.url) as session:
                found = auth.session_principal(session, int(str(payload["uid"])), str(payload["csrf"]))
    if found is None:
        if request.url.path.startswith("/review"):
            raise NotLoggedIn()
        raise HTTPException(401, "authentication required: a bearer token or a login session",
                            headers={"WWW-Authenticate": "Bearer"})
    if found.via == "session" and request.method not in SAFE_METHODS and \
            not auth.csrf_matches(found.csrf, await _csrf_given(request)):
        raise HTTPException(403, "missing or wrong CSRF token")
    request.state.principal = found
    return found


def reviewer(who: Annotated[auth.Principal, Depends(principal)]) -> auth.Principal:
    """Reviewers and admins."""
    if who.role not in auth.ROLES:
        raise HTTPException(403, "a reviewer or admin role is required")
    return who


def admin(who: Annotated[auth.Principal, Depends(principal)]) -> auth.Principal:
    """Admins only (users and models)."""
    if not who.is_admin:
        raise HTTPException(403, "only admins may do this")
    return who


@dataclass(frozen=True)
class Page:
    page: int
    page_size: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.page_size


def page(page: Annotated[int, Query(ge=1, le=100_000)] = 1,
         page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50) -> Page:
    return Page(page, page_size)


Reviewer = Annotated[auth.Principal, Depends(reviewer)]
Admin = Annotated[auth.Principal, Depends(admin)]
Paging = Annotated[Page, Depends(page)]
State = Annotated[ServiceState, Depends(state)]
