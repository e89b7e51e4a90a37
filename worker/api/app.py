"""The review service: ``create_app(settings)`` builds the FastAPI application.

JSON API under ``/api/v1`` (OpenAPI at ``/openapi.json``, interactive docs at ``/docs``), the
reviewers' web pages under ``/review``, and the unauthenticated probes ``/healthz`` (the
process answers) and ``/readyz`` (database reachable with its schema at head, Redis reachable
when one is configured). Everything else needs a bearer token or a login session.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api.deps import NotLoggedIn, ServiceState
from worker.config import Settings
from worker.observe import metrics
from worker.observe.asgi import RequestMetrics

#: Largest request body accepted (JSON decisions and login forms are a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
#: The key that signs browser sessions; without it each process makes one up, so sessions end
#: when the service restarts and several service processes do not share them.
SECRET_ENV = "CATALOG_API_SECRET"
STATIC_DIR = Path(__file__).parent / "static"


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413: by Content-Length before reading, and by
    counting while reading when the client streams without one."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, uploads: dict[str, int] | None = None) -> None:
        self.app, self.limit = app, limit
        self.uploads = uploads or {}  # path -> its own, larger limit (photo uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.uploads.get(str(scope.get("path", "")), self.limit)
        detail = "request body too large" + (
            " for a photo (CATALOG_FETCH_MAX_BYTES)" if limit != self.limit else "")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await JSONResponse({"detail": detail}, 413)(scope, receive, send)
            return
        seen = 0
        answered = False

        async def guarded_send(message: Message) -> None:
            if not answered:  # after our 413 the app's own answer (to the cut body) is dropped
                await send(message)

        async def counted() -> Message:
            nonlocal seen, answered
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit and not answered:
                await JSONResponse({"detail": detail}, 413)(scope, receive, send)
                answered = True
            if answered:  # the app sees the client leave and stops reading
                return {"type": "http.disconnect"}
            return message

        await self.app(scope, counted, guarded_send)


class SecurityHeaders:
    """Headers on every answer: no sniffing, no framing, no referrer leaks; pages get a
    content security policy that allows only this service's own scripts and images."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = str(scope.get("path", "")).startswith("/review")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"same-origin")]
                if page:
                    extra.append((b"content-security-policy",
                                  b"default-src 'self'; img-src 'self'; script-src 'self'; "
                                  b"style-src 'self'; form-action 'self'; frame-ancestors 'none'"))
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings, *, secret: bytes | None = None, secure_cookies: bool | None = None) -> FastAPI:
    """The service for ``settings``. ``secure_cookies`` marks the session cookie Secure (the
    service sits behind https); by default it follows the request's scheme."""
    from worker.api.routes import admin, files, flags, labels, listings, pages, search

    configured = settings.api_secret.get_secret_value().encode() if settings.api_secret else b""
    key = secret or configured or secrets.token_bytes(32)
    app = FastAPI(title="catalog-worker review service", version="1",
                  description="Listings, analysis results, the fraud-flag queue and reviewers' decisions. "
                  "Authenticate with `Authorization: Bearer <token>` (`catalog users token NAME`).")
    app.state.service = ServiceState(settings=settings, secret=key, secure_cookies=secure_cookies)

    @app.exception_handler(NotLoggedIn)
    async def _to_login(request: Request, exc: NotLoggedIn) -> RedirectResponse:
        return RedirectResponse("/review/login", status_code=303)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: database (schema at head) and Redis reachable")
    def readyz() -> JSONResponse:
        checks = readiness(settings)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of this service (no authentication)")
    def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    for module in (listings, files, flags, labels, admin, pages, search):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    wrapped: Any = app
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, uploads=dict.fromkeys(search.UPLOAD_PATHS, search.upload_body_limit(settings)))
    app.add_middleware(RequestMetrics)
    return wrapped


def redis_configured(settings: Settings) -> bool:
    return bool(settings.redis_url) or settings.effective_broker_url.startswith(("redis://", "rediss://"))


def readiness(settings: Settings) -> dict[str, str]:
    """Each dependency's state: "ok" or why not (the reason never includes credentials)."""
    from db.migrate import is_up_to_date
    from db.session import get_engine

    url = settings.effective_database_url
    checks: dict[str, str] = {}
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
        checks["schema"] = "ok" if is_up_to_date(url) else "not at head: run `catalog db upgrade`"
    except Exception as exc:  # noqa: BLE001  (any failure means not ready; the kind is reported)
        checks["database"] = f"unreachable ({type(exc).__name__})"
    if redis_configured(settings):
        import redis

        try:
            client = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=2, socket_connect_timeout=2)
            client.ping()
            client.close()
            checks["redis"] = "ok"
        except redis.RedisError as exc:
            checks["redis"] = f"unreachable ({type(exc).__name__})"
    return checks
