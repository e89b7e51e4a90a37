"""Photos and artifacts are served only when the database references them: no path traversal,
nothing outside the artifact directory or the allowed photo directories, no remote fetches,
content types from the bytes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from db import models as m
from db.session import transaction
from worker.config import Settings


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 10), (10, 200, 30)).save(path, "PNG")
    return path


def _image(pg_url: str, url: str) -> int:
    with transaction(pg_url) as session:
        listing = m.Listing(external_id=f"ext-{uuid.uuid4().hex[:10]}", seller_id="s", title="")
        session.add(listing)
        session.flush()
        img = m.Image(listing_id=listing.id, url=url, status="done")
        session.add(img)
        session.flush()
        return img.id


def _artifact(pg_url: str, image_id: int, path: str) -> int:
    with transaction(pg_url) as session:
        row = m.ArtifactRecord(image_id=image_id, kind="cutout", path=path, model_version="seg@1")
        session.add(row)
        session.flush()
        return row.id


def test_artifact_inside_the_artifact_dir_is_served_as_png(client: TestClient, pg_url: str, reviewer,
                                                            api_settings: Settings) -> None:
    image_id = _image(pg_url, "https://img.example/x.jpg")
    path = _png(api_settings.effective_artifact_dir / "cutouts" / "a.png")
    art = _artifact(pg_url, image_id, str(path))
    answer = client.get(f"/api/v1/artifacts/{art}", headers=reviewer.headers)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.content == path.read_bytes()


@pytest.mark.parametrize("raw", ["..%2F..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2Fetc%2Fpasswd",
                                 "1%00", "-1", "1.0", "99999999999999999999999"])
def test_path_traversal_on_the_artifact_route_is_404(client: TestClient, reviewer, raw: str) -> None:
    answer = client.get(f"/api/v1/artifacts/{raw}", headers=reviewer.headers)
    assert answer.status_code == 404
    assert "root:" not in answer.text


def test_artifact_rows_pointing_outside_the_artifact_dir_are_404(client: TestClient, pg_url: str, reviewer,
                                                                  api_settings: Settings, tmp_path: Path) -> None:
    image_id = _image(pg_url, "https://img.example/x.jpg")
    outside = _png(tmp_path / "elsewhere" / "b.png")
    inside = api_settings.effective_artifact_dir
    inside.mkdir(parents=True, exist_ok=True)
    (inside / "link.png").symlink_to(outside)
    text_file = inside / "notes.png"
    text_file.write_text("<script>alert(1)</script>")
    for path in ("/etc/passwd", str(outside), "../elsewhere/b.png", str(inside / "link.png"), str(text_file),
                 str(inside)):
        art = _artifact(pg_url, image_id, path)
        assert client.get(f"/api/v1/artifacts/{art}", headers=reviewer.headers).status_code == 404, path


def test_photo_is_served_only_from_allowed_local_files(client: TestClient, pg_url: str, reviewer,
                                                       photo_dir: Path, tmp_path: Path) -> None:
    ok = _png(photo_dir / "p.png")
    for url in (str(ok), ok.as_uri()):
        answer = client.get(f"/api/v1/images/{_image(pg_url, url)}/photo", headers=reviewer.headers)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    secret = _png(tmp_path / "private" / "s.png")
    for url in (str(secret), "/etc/passwd", f"{photo_dir}/../private/s.png", "/proc/self/environ",
                "https://img.example/remote.jpg", "http://127.0.0.1:6379/"):
        answer = client.get(f"/api/v1/images/{_image(pg_url, url)}/photo", headers=reviewer.headers)
        assert answer.status_code == 404, url
    assert client.get("/api/v1/images/..%2F1/photo", headers=reviewer.headers).status_code == 404
