"""Authentication and roles on every route, found by walking the published OpenAPI schema and
the app's routes; sessions, CSRF, login rate limit, body size limit, tokens and passwords."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select

from db import models as m
from db.session import transaction
from worker.api import auth

PUBLIC = {"/healthz", "/readyz", "/metrics"}  # /metrics: Prometheus scrapes it without a token


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    ops = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            ops.append((method.upper(), path, op.get("tags", [])))
    return ops


def _all_routes(routes: list[Any]) -> list[Any]:
    """Every route, also those of included routers (FastAPI may keep them nested)."""
    out = []
    for route in routes:
        nested = getattr(route, "original_router", None)
        out.extend(_all_routes(nested.routes) if nested is not None else [route])
    return out


def _concrete(path: str) -> str:
    # Ids that exist nowhere: an authorised call gets 404/422, never a success by accident.
    return re.sub(r"\{[^}]+\}", "987654321", path)


def test_schema_is_published_and_lists_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = set(schema["paths"])
    for wanted in ("/api/v1/listings", "/api/v1/flags/claim", "/api/v1/flags/{flag_id}/resolve",
                   "/api/v1/artifacts/{artifact_id}", "/api/v1/images/{image_id}/tags/{name}/confirm",
                   "/api/v1/users", "/healthz", "/readyz"):
        assert wanted in paths
    assert client.get("/docs").status_code == 200


def test_every_route_needs_a_token_and_admin_routes_need_an_admin(client: TestClient, reviewer, admin) -> None:
    ops = _operations(client.get("/openapi.json").json())
    assert len(ops) >= 25
    admin_ops = [(meth, path) for meth, path, tags in ops if "admin" in tags]
    assert {"/api/v1/users", "/api/v1/models"} <= {p for _, p in admin_ops}
    for method, path, tags in ops:
        url = _concrete(path)
        if path in PUBLIC:
            assert client.request(method, url).status_code in (200, 503)
            continue
        none = client.request(method, url)
        assert none.status_code == 401, (method, path, none.status_code)
        assert none.headers.get("www-authenticate") == "Bearer"
        bogus = client.request(method, url, headers={"Authorization": "Bearer cat_not-a-token"})
        assert bogus.status_code == 401, (method, path)
        as_reviewer = client.request(method, url, headers=reviewer.headers)
        as_admin = client.request(method, url, headers=admin.headers)
        if "admin" in tags:
            assert as_reviewer.status_code == 403, (method, path, as_reviewer.status_code)
        else:
            assert as_reviewer.status_code not in (401, 403), (method, path, as_reviewer.text)
        assert as_admin.status_code not in (401, 403), (method, path, as_admin.text)


def test_routes_outside_the_schema_are_the_review_pages_and_send_strangers_to_login(app: FastAPI,
                                                                                      client: TestClient) -> None:
    schema_paths = set(client.get("/openapi.json").json()["paths"])
    hidden = [r for r in _all_routes(app.routes) if isinstance(r, APIRoute) and r.path not in schema_paths]
    assert hidden, "the review pages should exist"
    for route in hidden:
        assert route.path.startswith("/review"), route.path
        if route.path == "/review/login":
            continue
        for method in route.methods or ():
            answer = client.request(method, _concrete(route.path), follow_redirects=False)
            assert answer.status_code == 303 and answer.headers["location"] == "/review/login", route.path


def test_deactivated_user_and_revoked_token_are_refused(client: TestClient, make_user, pg_url: str) -> None:
    user = make_user("reviewer")
    assert client.get("/api/v1/flags", headers=user.headers).status_code == 200
    with transaction(pg_url) as session:
        auth.deactivate_user(session, user.name)
    assert client.get("/api/v1/flags", headers=user.headers).status_code == 401


def test_tokens_and_passwords_are_stored_hashed(pg_url: str, reviewer) -> None:
    with transaction(pg_url) as session:
        user = session.execute(select(m.ApiUser).where(m.ApiUser.name == reviewer.name)).scalar_one()
        stored = session.execute(select(m.ApiToken.token_hash).where(m.ApiToken.user_id == user.id)).scalars().all()
        assert user.password_hash and user.password_hash.startswith("$argon2id$")
        assert "correct horse" not in user.password_hash
    assert stored == [auth.hash_token(reviewer.token)] and reviewer.token not in stored


def test_session_cookie_flags_and_csrf_on_form_posts(client: TestClient, reviewer, log_in, pg_url: str) -> None:
    with transaction(pg_url) as session:
        flag = m.Flag(listing_id=_listing(session), kind="csrf_test", score=0.9, evidence={})
        session.add(flag)
        session.flush()
        flag_id = flag.id
    page = client.get("/review/login")
    login_token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    # A login form posted without (or with another) login token is refused.
    refused = client.post("/review/login", data={"name": reviewer.name, "password": "correct horse battery",
                                                 "csrf_token": "forged"}, follow_redirects=False)
    assert refused.status_code == 403
    answer = client.post("/review/login", data={"name": reviewer.name, "password": "correct horse battery",
                                                "csrf_token": login_token}, follow_redirects=False)
    cookie = answer.headers["set-cookie"]
    assert "catalog_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    csrf = log_in(client, reviewer.name)

    url = f"/review/flags/{flag_id}/decide"
    assert client.post(url, data={"verdict": "confirmed"}, follow_redirects=False).status_code == 403
    assert client.post(url, data={"verdict": "confirmed", "csrf_token": "x" * 32},
                       follow_redirects=False).status_code == 403
    # The JSON API with the cookie (not a token) needs the header too.
    assert client.post(f"/api/v1/flags/{flag_id}/claim").status_code == 403
    with transaction(pg_url) as session:
        assert session.get_one(m.Flag, flag_id).status == "open"
    ok = client.post(url, data={"verdict": "confirmed", "csrf_token": csrf, "note": "n"}, follow_redirects=False)
    assert ok.status_code == 303
    with transaction(pg_url) as session:
        row = session.get_one(m.Flag, flag_id)
        assert (row.status, row.reviewed_by) == ("confirmed", reviewer.name)


def test_login_rate_limit(client: TestClient, reviewer) -> None:
    page = client.get("/review/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    codes = [client.post("/review/login", data={"name": reviewer.name, "password": "wrong-password",
                                                "csrf_token": token}, follow_redirects=False).status_code
             for _ in range(6)]
    assert codes[:5] == [303] * 5 and codes[5] == 429
    # Even the right password is refused while the limit holds.
    right = client.post("/review/login", data={"name": reviewer.name, "password": "correct horse battery",
                                               "csrf_token": token}, follow_redirects=False)
    assert right.status_code == 429


def test_request_body_size_limit(client: TestClient, reviewer) -> None:
    big = {"verdict": "confirmed", "note": "x" * 100_000}
    assert client.post("/api/v1/flags/1/resolve", json=big, headers=reviewer.headers).status_code == 413


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    assert ready.json()["checks"]["schema"] == "ok"


def test_readiness_reports_an_unreachable_database(make_settings) -> None:
    from worker.api.app import create_app

    settings = make_settings(database_url="postgresql+psycopg2://postgres@127.0.0.1:1/nothing")
    with TestClient(create_app(settings)) as c:
        answer = c.get("/readyz")
    assert answer.status_code == 503 and answer.json()["checks"]["database"].startswith("unreachable")


def _listing(session: Any) -> int:
    import uuid

    listing = m.Listing(external_id=f"ext-{uuid.uuid4().hex[:10]}", seller_id="s", title="")
    session.add(listing)
    session.flush()
    return listing.id


def test_session_cookie_is_secure_behind_https(api_settings, reviewer) -> None:
    from worker.api.app import create_app

    for app, base, secure in ((create_app(api_settings, secure_cookies=True), "https://testserver", True),
                              (create_app(api_settings), "https://testserver", True),
                              (create_app(api_settings), "http://testserver", False),
                              (create_app(api_settings, secure_cookies=False), "https://testserver", False)):
        with TestClient(app, base_url=base) as c:
            page = c.get("/review/login")
            token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
            answer = c.post("/review/login", data={"name": reviewer.name, "password": "correct horse battery",
                                                   "csrf_token": token}, follow_redirects=False)
            cookie = answer.headers["set-cookie"]
            assert answer.status_code == 303 and ("; secure" in cookie.lower()) is secure, (base, cookie)


def test_streamed_body_without_length_is_cut_at_the_limit(client: TestClient, reviewer) -> None:
    def chunks():
        yield b'{"verdict": "confirmed", "note": "'
        for _ in range(200):
            yield b"x" * 1024
        yield b'"}'

    answer = client.post("/api/v1/flags/1/resolve", content=chunks(),
                         headers={**reviewer.headers, "Content-Type": "application/json"})
    assert answer.status_code == 413
