"""Listings and what the worker found in their photos (read-only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from sqlalchemy import func, select

from db import models as m
from worker.api.deps import Paging, Reviewer, tx
from worker.io.hashing import to_hex
from worker.review.queue import FlagView
from worker.steps.metadata import THUMBNAIL_KIND

router = APIRouter(prefix="/api/v1", tags=["listings"])


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def listing_summary(listing: m.Listing) -> dict[str, Any]:
    return {"id": listing.external_id, "seller_id": listing.seller_id, "title": listing.title,
            "category": listing.category, "status": listing.status, "fraud_score": listing.fraud_score,
            "fraud_decision": listing.fraud_decision, "created_at": _iso(listing.created_at),
            "processed_at": _iso(listing.processed_at)}


@router.get("/listings", summary="Listings, newest first, with filters")
def list_listings(request: Request, who: Reviewer, paging: Paging,
                  seller: str | None = None, status: str | None = None,
                  decision: Annotated[str | None, Query(description="ok, review, hold, incomplete")] = None,
                  category: str | None = None,
                  since: Annotated[datetime | None, Query(description="created at or after (ISO 8601)")] = None,
                  until: Annotated[datetime | None, Query(description="created before (ISO 8601)")] = None,
                  ) -> dict[str, Any]:
    if status is not None and status not in m.LISTING_STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(m.LISTING_STATUSES)}")
    if decision is not None and decision not in m.FRAUD_DECISIONS:
        raise HTTPException(422, f"decision must be one of {', '.join(m.FRAUD_DECISIONS)}")
    stmt = select(m.Listing)
    for column, value in ((m.Listing.seller_id, seller), (m.Listing.status, status),
                          (m.Listing.fraud_decision, decision), (m.Listing.category, category)):
        if value is not None:
            stmt = stmt.where(column == value)
    if since is not None:
        stmt = stmt.where(m.Listing.created_at >= since)
    if until is not None:
        stmt = stmt.where(m.Listing.created_at < until)
    with tx(request) as session:
        total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
        rows = session.execute(stmt.order_by(m.Listing.created_at.desc(), m.Listing.id.desc())
                               .offset(paging.offset).limit(paging.page_size)).scalars().all()
        items = [listing_summary(r) for r in rows]
    return {"items": items, "page": paging.page, "page_size": paging.page_size, "total": total}


def image_detail(session: Any, img: m.Image) -> dict[str, Any]:
    tags = session.execute(select(m.Tag).where(m.Tag.image_id == img.id)
                           .order_by(m.Tag.source, m.Tag.score.desc())).scalars()
    dets = session.execute(select(m.Detection).where(m.Detection.image_id == img.id)
                           .order_by(m.Detection.score.desc())).scalars()
    arts = session.execute(select(m.ArtifactRecord).where(m.ArtifactRecord.image_id == img.id)
                           .order_by(m.ArtifactRecord.id)).scalars().all()
    flags = session.execute(select(m.Flag).where(m.Flag.image_id == img.id).order_by(m.Flag.id)).scalars()
    return {
        "id": img.id, "position": img.position, "url": img.url, "status": img.status, "error": img.error,
        "complete": img.complete, "width": img.width, "height": img.height, "format": img.format,
        "sha256": img.sha256, "phash": to_hex(img.phash), "dhash": to_hex(img.dhash),
        "photo": f"/api/v1/images/{img.id}/photo",
        # What to show of the photo: served for remote photos too (the original is not).
        "thumbnail": (f"/api/v1/images/{img.id}/thumbnail"
                      if any(a.kind == THUMBNAIL_KIND for a in arts) else None),
        "tags": [{"id": t.id, "name": t.name, "score": round(t.score, 4), "source": t.source,
                  "model_version": t.model_version} for t in tags],
        "detections": [{"id": d.id, "label": d.label, "score": round(d.score, 4),
                        "box": [round(v, 1) for v in (d.x0, d.y0, d.x1, d.y1)],
                        "model_version": d.model_version} for d in dets],
        "artifacts": [{"id": a.id, "kind": a.kind, "width": a.width, "height": a.height,
                       "model_version": a.model_version, "url": f"/api/v1/artifacts/{a.id}"} for a in arts],
        "flags": [FlagView.of(f).to_dict() for f in flags],
    }


@router.get("/listings/{external_id}", summary="One listing (by the shop's id) with its images, "
            "tags, detections, artifacts and flags")
def get_listing(request: Request, who: Reviewer, external_id: str) -> dict[str, Any]:
    with tx(request) as session:
        listing = session.execute(select(m.Listing).where(m.Listing.external_id == external_id)
                                  ).scalar_one_or_none()
        if listing is None:
            raise HTTPException(404, f"no listing with id {external_id!r}")
        listing_flags = session.execute(select(m.Flag).where(m.Flag.listing_id == listing.id,
                                                             m.Flag.image_id.is_(None))).scalars()
        return {**listing_summary(listing),
                "images": [image_detail(session, img) for img in listing.images],
                "listing_flags": [FlagView.of(f).to_dict() for f in listing_flags]}
