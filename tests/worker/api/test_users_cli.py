"""`catalog users`: accounts made on the command line work against the service."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from worker.cli.main import main


def test_add_user_issue_token_and_use_it(pg_url: str, client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                         log_in) -> None:
    monkeypatch.setenv("CATALOG_DATABASE_URL", pg_url)
    runner = CliRunner()
    import uuid

    name = f"cli-{uuid.uuid4().hex[:6]}"
    added = runner.invoke(main, ["users", "add", name, "--role", "reviewer", "--password-stdin"],
                          input="correct horse battery\n")
    assert added.exit_code == 0, added.output
    again = runner.invoke(main, ["users", "add", name, "--role", "reviewer"])
    assert again.exit_code == 1 and "already exists" in again.output
    bad_role = runner.invoke(main, ["users", "add", name + "x", "--role", "root"])
    assert bad_role.exit_code == 2
    issued = runner.invoke(main, ["users", "token", name])
    token = issued.output.strip()
    assert issued.exit_code == 0 and token.startswith("cat_") and len(token) > 40
    me = client.get("/api/v1/me/history", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["user"] == name and me.json()["role"] == "reviewer"
    assert client.get("/api/v1/users", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    log_in(client, name)  # the password works on the login page
    listed = runner.invoke(main, ["users", "list"])
    assert name in listed.output and "1 token(s)" in listed.output.split(name)[1].splitlines()[0]
    assert runner.invoke(main, ["users", "deactivate", name]).exit_code == 0
    assert client.get("/api/v1/me/history", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_admin_creates_users_and_tokens_over_the_api(client: TestClient, admin) -> None:
    import uuid

    name = f"api-{uuid.uuid4().hex[:6]}"
    made = client.post("/api/v1/users", json={"name": name, "role": "reviewer"}, headers=admin.headers)
    assert made.status_code == 201 and made.json()["has_password"] is False
    assert client.post("/api/v1/users", json={"name": name, "role": "reviewer"},
                       headers=admin.headers).status_code == 409
    token = client.post(f"/api/v1/users/{name}/tokens", headers=admin.headers).json()["token"]
    assert client.get("/api/v1/flags", headers={"Authorization": f"Bearer {token}"}).status_code == 200
