"""Review-service test helpers: a reviewer account and logging in through the form."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.testclient import TestClient

PASSWORD = "correct horse battery"


@dataclass
class User:
    name: str
    role: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def login(client: TestClient, name: str, password: str = PASSWORD) -> str:
    """Log in through the form; returns the session's CSRF token (read from a page)."""
    page = client.get("/review/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    answer = client.post("/review/login", data={"name": name, "password": password, "csrf_token": token},
                         follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/review", answer.text
    queue_page = client.get("/review")
    return queue_page.text.split('name="csrf_token" value="')[1].split('"')[0]
