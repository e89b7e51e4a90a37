"""The API serves its own Prometheus metrics at GET /metrics, without a token."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from tests.worker.observe.test_metrics import scrape
from worker.api.app import create_app


def test_api_serves_metrics_without_a_token(tmp_path: Path, sqlite_template: Path, make_settings) -> None:
    db = tmp_path / "c.db"
    shutil.copy(sqlite_template, db)
    with TestClient(create_app(make_settings(database_url=f"sqlite:///{db}"))) as client:
        first = client.get("/metrics")
        assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
        before = scrape(first.text).get(
            ("catalog_http_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200"))), 0)
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/v1/listings").status_code == 401
        client.get("/no/such/page/12345")
        got = scrape(client.get("/metrics").text)
    assert got[("catalog_http_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200")))] \
        == before + 1
    assert got[("catalog_http_requests_total",
                (("method", "GET"), ("route", "/api/v1/listings"), ("status", "401")))] >= 1
    assert not any("12345" in dict(labels).get("route", "") for _, labels in got)
    assert any(name == "catalog_http_request_duration_seconds_count" for name, _ in got)
