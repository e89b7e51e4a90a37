"""Photos and artifacts, served only when the database references them.

* An artifact is served by its row id; its stored path must resolve (symlinks followed) inside
  the artifact directory, else 404. The URL carries no path at all, so there is nothing to
  traverse: anything but a known id is 404 too.
* A listing photo is served only when the worker read it from a local file, through the same
  fence as the worker (``CATALOG_FETCH_ALLOW_DIRS``, never /proc, /sys, /dev). A remote URL is
  never fetched on the browser's behalf: that would make the service an open proxy into the
  shop's network (404). What the pages show instead is the photo's thumbnail, which the
  worker's metadata step stored as an artifact (``/images/{id}/thumbnail``, served by the same
  rules as any artifact).
* The content type comes from the file's leading bytes, never from the stored name, and every
  answer says ``nosniff``.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy import select

from db import models as m
from worker.api.deps import Reviewer, state, tx
from worker.io.errors import ImageLoadError
from worker.io.local import file_url_path, read_local_file
from worker.steps.metadata import THUMBNAIL_KIND

router = APIRouter(prefix="/api/v1", tags=["files"])

_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"),
          (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))
_NOT_FOUND = "not found"


def content_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    return None


def _image_response(data: bytes) -> Response:
    kind = content_type(data)
    if kind is None:  # not an image we know: never let a browser guess
        raise HTTPException(404, _NOT_FOUND)
    return Response(data, media_type=kind, headers={
        "X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=300",
        "Content-Security-Policy": "default-src 'none'"})


def is_remote(url: str) -> bool:
    """A photo the worker fetched over the network (never served by this service, only its
    thumbnail), as opposed to a local path or ``file:`` URL."""
    return not url.startswith("file:") and "://" in url


def _parse_id(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 18:
        raise HTTPException(404, _NOT_FOUND)
    return int(raw)


def _artifact_response(request: Request, path: str | None) -> Response:
    """The artifact file a database row names, if it really lies inside the artifact directory."""
    service = state(request)
    if path is None:
        raise HTTPException(404, _NOT_FOUND)
    root = os.path.realpath(service.settings.effective_artifact_dir)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    if not real.startswith(root.rstrip("/") + "/") or not os.path.isfile(real):
        raise HTTPException(404, _NOT_FOUND)
    with open(real, "rb") as fh:
        data = fh.read(service.settings.fetch_max_bytes + 1)
    if len(data) > service.settings.fetch_max_bytes:
        raise HTTPException(404, _NOT_FOUND)
    return _image_response(data)


@router.get("/artifacts/{artifact_id}", summary="An artifact file (thumbnail, cutout, enhanced image) by its id",
            response_class=Response, responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})
def get_artifact(request: Request, who: Reviewer, artifact_id: str) -> Response:
    with tx(request) as session:
        row = session.get(m.ArtifactRecord, _parse_id(artifact_id))
        path = row.path if row is not None else None
    return _artifact_response(request, path)


def thumbnail_artifact(session: Any, image_id: int) -> m.ArtifactRecord | None:
    """The image's newest stored thumbnail (one per analysis; the newest is the current one)."""
    return session.execute(select(m.ArtifactRecord).where(
        m.ArtifactRecord.image_id == image_id, m.ArtifactRecord.kind == THUMBNAIL_KIND,
    ).order_by(m.ArtifactRecord.id.desc()).limit(1)).scalar()


@router.get("/images/{image_id}/thumbnail", summary="The photo's thumbnail the worker stored (JPEG; "
            "what to show of a remote photo, which the service never fetches)",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def get_thumbnail(request: Request, who: Reviewer, image_id: str) -> Response:
    with tx(request) as session:
        row = thumbnail_artifact(session, _parse_id(image_id))
        path = row.path if row is not None else None
    return _artifact_response(request, path)


@router.get("/images/{image_id}/photo", summary="The listing photo the worker read (local files only)",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def get_photo(request: Request, who: Reviewer, image_id: str) -> Response:
    service = state(request)
    with tx(request) as session:
        url = session.execute(select(m.Image.url).where(m.Image.id == _parse_id(image_id))).scalar()
    if url is None:
        raise HTTPException(404, _NOT_FOUND)
    try:
        if url.startswith("file:"):
            path = file_url_path(url)
        elif is_remote(url):
            raise HTTPException(404, "the photo is remote; it is not fetched for the browser (see its thumbnail)")
        else:
            path = url
        data = read_local_file(path, url, service.settings)
    except ImageLoadError:
        raise HTTPException(404, _NOT_FOUND) from None
    return _image_response(data)
