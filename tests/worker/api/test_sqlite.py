"""The service on the embedded SQLite database (the default of `catalog api` after `catalog demo`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from db import models as m
from db.session import transaction
from worker.api import auth
from worker.api.app import create_app


def test_queue_and_listings_work_on_sqlite(tmp_path: Path, sqlite_template: Path, make_settings) -> None:
    path = tmp_path / "catalog.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    with transaction(url) as session:
        auth.create_user(session, "ann", "reviewer")
        token = auth.issue_token(session, "ann")
        listing = m.Listing(external_id="demo-listing", seller_id="s", title="t", status="done")
        session.add(listing)
        session.flush()
        session.add(m.Flag(listing_id=listing.id, kind="duplicate_image", score=0.9, evidence={}))
    h = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(make_settings(database_url=url))) as c:
        assert c.get("/readyz").json()["checks"] == {"database": "ok", "schema": "ok"}
        assert [x["id"] for x in c.get("/api/v1/listings", headers=h).json()["items"]] == ["demo-listing"]
        flag = c.post("/api/v1/flags/claim", headers=h).json()
        assert flag["listing_external_id"] == "demo-listing" and flag["claimed_by"] == "ann"
        assert flag["claim_expires_at"].endswith("+00:00")
        done = c.post(f"/api/v1/flags/{flag['id']}/resolve", json={"verdict": "confirmed"}, headers=h)
        assert done.status_code == 200 and done.json()["reviewed_by"] == "ann"
        assert c.post("/api/v1/flags/claim", headers=h).status_code == 204
