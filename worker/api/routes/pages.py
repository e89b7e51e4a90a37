"""The reviewers' web pages (server-rendered, a little vanilla JavaScript, no build step).

Every form post carries the session's CSRF token; the login form carries a signed one-off
token that must match its cookie (a login CSRF would log the victim into the attacker's
account). Decisions go through worker.review.queue, exactly as the API and the CLI do."""

from __future__ import annotations

import secrets
import time
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from db import models as m
from worker.api import auth
from worker.api.deps import Reviewer, state, tx
from worker.api.routes.files import is_remote
from worker.fraud.champion import fraud_weights
from worker.pipeline.store import lock_listing
from worker.review import queue
from worker.steps.metadata import THUMBNAIL_KIND

router = APIRouter(prefix="/review", include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parents[1] / "templates"))
LOGIN_COOKIE = "catalog_login"


def _secure(request: Request) -> bool:
    configured = state(request).secure_cookies
    return request.url.scheme == "https" if configured is None else configured


def _page(request: Request, name: str, who: auth.Principal | None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"who": who, "csrf": who.csrf if who else None, **context})


def _see(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.get("/login")
def login_form(request: Request, error: str | None = None) -> HTMLResponse:
    token = secrets.token_urlsafe(16)
    signed = auth.sign(state(request).secret, {"login": token, "exp": int(time.time()) + 3600})
    response = _page(request, "login.html", None, login_csrf=signed, error=error)
    response.set_cookie(LOGIN_COOKIE, signed, httponly=True, samesite="lax", secure=_secure(request),
                        max_age=3600, path="/review")
    return response


@router.post("/login")
def login(request: Request, name: Annotated[str, Form(max_length=255)],
          password: Annotated[str, Form(max_length=1024)],
          csrf_token: Annotated[str, Form(max_length=512)]) -> Response:
    service = state(request)
    cookie = request.cookies.get(LOGIN_COOKIE)
    if not auth.csrf_matches(cookie, csrf_token) or auth.unsign(service.secret, cookie) is None:
        raise HTTPException(403, "missing or wrong CSRF token: reload the login page")
    keys = (f"ip:{request.client.host if request.client else '?'}", f"user:{name}")
    if service.limiter.blocked(*keys):
        raise HTTPException(429, "too many failed logins: wait a few minutes")
    with tx(request) as session:
        user = auth.authenticate_password(session, name, password)
        user_id = user.id if user is not None else None
    if user_id is None:
        service.limiter.failed(*keys)
        return _see("/review/login?error=1")
    service.limiter.succeeded(*keys)
    value, _csrf = auth.new_session_cookie(service.secret, user_id)
    response = _see("/review")
    response.set_cookie(auth.SESSION_COOKIE, value, httponly=True, samesite="lax", secure=_secure(request),
                        max_age=auth.SESSION_SECONDS, path="/")
    response.delete_cookie(LOGIN_COOKIE, path="/review")
    return response


@router.post("/logout")
def logout(who: Reviewer) -> Response:
    response = _see("/review/login")
    response.delete_cookie(auth.SESSION_COOKIE, path="/")
    return response


@router.get("")
def queue_page(request: Request, who: Reviewer, kind: str | None = None, message: str | None = None) -> HTMLResponse:
    weights = fraud_weights(state(request).settings).weights
    with tx(request) as session:
        kinds = queue.valid_kinds(session)
        kind = kind if kind in kinds else None
        mine = queue.list_flags(session, status="claimed", claimed_by=who.name, weights=weights)
        waiting = queue.list_flags(session, status="claimable", kind=kind, weights=weights, limit=100)
        stats = queue.queue_stats(session)
    return _page(request, "queue.html", who, mine=mine, waiting=waiting, stats=stats, kinds=kinds,
                 kind=kind, message=message)


@router.post("/next")
def next_flag(request: Request, who: Reviewer) -> Response:
    settings = state(request).settings
    with tx(request) as session:
        weights = fraud_weights(settings).weights
        flag = queue.claim_next_flag(session, who.name, settings.flag_claim_ttl, weights=weights)
    if flag is None:
        return _see("/review?message=The+queue+is+empty")
    return _see(f"/review/flags/{flag.id}")


def _image(session: Any, image_id: Any) -> dict[str, Any] | None:
    if not isinstance(image_id, int):
        return None
    img = session.get(m.Image, image_id)
    if img is None:
        return None
    listing = session.get(m.Listing, img.listing_id)
    dets = session.execute(select(m.Detection).where(m.Detection.image_id == img.id)).scalars()
    arts = session.execute(select(m.ArtifactRecord).where(m.ArtifactRecord.image_id == img.id)
                           .order_by(m.ArtifactRecord.id)).scalars().all()
    original = None if is_remote(img.url) else f"/api/v1/images/{img.id}/photo"
    # What the worker stored is shown: its thumbnail (the only picture of a remote photo; the
    # service never fetches a URL for the browser). Photos analysed before thumbnails existed
    # fall back to the original when it is a local file.
    has_thumbnail = any(a.kind == THUMBNAIL_KIND for a in arts)
    return {"id": img.id, "url": img.url, "width": img.width, "height": img.height,
            "photo": f"/api/v1/images/{img.id}/thumbnail" if has_thumbnail else original,
            "original": original,
            # SQLite hands back naive datetimes; every stored time is UTC.
            "created_at": img.created_at.replace(tzinfo=img.created_at.tzinfo or UTC) if img.created_at else None,
            "seller_id": listing.seller_id if listing else None,
            "listing_external_id": listing.external_id if listing else None,
            "detections": [{"label": d.label, "score": round(d.score, 2), "box": [d.x0, d.y0, d.x1, d.y1]}
                           for d in dets],
            "artifacts": [{"id": a.id, "kind": a.kind} for a in arts if a.kind != THUMBNAIL_KIND]}


@router.get("/flags/{flag_id}")
def flag_page(request: Request, who: Reviewer, flag_id: int, error: str | None = None) -> HTMLResponse:
    with tx(request) as session:
        try:
            flag = queue.get_flag(session, flag_id)
        except queue.FlagNotFound:
            raise HTTPException(404, f"flag {flag_id} does not exist") from None
        this = _image(session, flag.image_id)
        matched = _image(session, flag.evidence.get("matched_image_id")) if flag.kind == "duplicate_image" else None
    boxes = [{"box": mm["box"], "label": f"{mm.get('type', '')}: {mm.get('text', '')}"}
             for mm in flag.evidence.get("matches", []) if isinstance(mm, dict) and "box" in mm]
    return _page(request, "flag.html", who, flag=flag, this=this, matched=matched, ocr_boxes=boxes,
                 error=error, held=flag.status == "claimed" and flag.claimed_by == who.name and not flag.claim_expired)


@router.get("/listings/{external_id}")
def listing_page(request: Request, who: Reviewer, external_id: str) -> HTMLResponse:
    """A listing as the worker saw it: each photo with its detection boxes, its cutout, tags, flags."""
    with tx(request) as session:
        listing = session.execute(select(m.Listing).where(m.Listing.external_id == external_id)).scalar_one_or_none()
        if listing is None:
            raise HTTPException(404, f"no listing with id {external_id!r}")
        images = []
        for img in listing.images:
            view = _image(session, img.id) or {}
            view["tags"] = session.execute(select(m.Tag).where(m.Tag.image_id == img.id)
                                           .order_by(m.Tag.score.desc())).scalars().all()
            view["flags"] = queue.list_flags(session, listing_id=listing.id)
            view["flags"] = [f for f in view["flags"] if f.image_id == img.id]
            images.append(view)
        info = {"external_id": listing.external_id, "seller_id": listing.seller_id, "title": listing.title,
                "category": listing.category, "status": listing.status, "fraud_score": listing.fraud_score,
                "fraud_decision": listing.fraud_decision}
    return _page(request, "listing.html", who, listing=info, images=images)


@router.post("/flags/{flag_id}/decide")
def decide(request: Request, who: Reviewer, flag_id: int,
           verdict: Annotated[str, Form(max_length=16)], note: Annotated[str, Form(max_length=4000)] = "") -> Response:
    """Claim (unless already held by this reviewer) and resolve in one transaction: deciding on
    the flag one looks at is one keystroke, and a flag someone else holds is refused."""
    settings = state(request).settings
    try:
        with tx(request) as session:
            # The lock order of worker.pipeline.store (listing, then flag), also for the claim.
            listing_id = session.execute(select(m.Flag.listing_id).where(m.Flag.id == flag_id)).scalar()
            if listing_id is not None:
                lock_listing(session, listing_id)
            queue.claim_flag(session, flag_id, who.name, settings.flag_claim_ttl)
            queue.resolve_flag(session, flag_id, who.name, verdict, note or None, settings=settings)
    except queue.FlagNotFound:
        raise HTTPException(404, f"flag {flag_id} does not exist") from None
    except queue.FlagQueueError as exc:
        return _see(f"/review/flags/{flag_id}?error={_quote(str(exc))}")
    return _see(f"/review/flags/{flag_id}")


@router.post("/flags/{flag_id}/release")
def release(request: Request, who: Reviewer, flag_id: int) -> Response:
    try:
        with tx(request) as session:
            queue.release_flag(session, flag_id, who.name)
    except queue.FlagQueueError as exc:
        return _see(f"/review/flags/{flag_id}?error={_quote(str(exc))}")
    return _see("/review")


@router.get("/history")
def history(request: Request, who: Reviewer) -> HTMLResponse:
    with tx(request) as session:
        items = queue.reviewer_history(session, who.name, limit=100)
    return _page(request, "history.html", who, items=items)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text[:300])
