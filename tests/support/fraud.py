"""Helpers shared by the fraud tests: a throwaway migrated Postgres database, listing/image
rows, and a step context built the way ``worker.pipeline.analyze`` builds it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import uuid
from collections.abc import Iterator

from PIL import Image, ImageOps
from sqlalchemy.orm import Session

import db.fraud_models  # noqa: F401  (registers image_hash_bands on Base.metadata)
from db import models as m
from db.migrate import upgrade
from worker.config import load_settings
from worker.pipeline.contract import ImageContext


@contextlib.contextmanager
def throwaway_pg(prefix: str = "fraud_test") -> Iterator[str]:
    from tests.support.services import PG_URL_BASE, create_pg_database, drop_pg_database

    name = create_pg_database(prefix)
    try:
        url = f"{PG_URL_BASE}/{name}"
        upgrade(url)
        yield url
    finally:
        drop_pg_database(name)


def add_image(session: Session, seller: str, img: Image.Image) -> tuple[m.Listing, m.Image, bytes]:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    raw = buf.getvalue()
    listing = m.Listing(external_id=f"ext-{uuid.uuid4().hex[:10]}", seller_id=seller, title="",
                        status="done")
    session.add(listing)
    session.flush()
    row = m.Image(listing_id=listing.id, url=f"https://img.example/{uuid.uuid4().hex}.png",
                  status="done", sha256=hashlib.sha256(raw).hexdigest())
    session.add(row)
    session.flush()
    return listing, row, raw


def step_context(listing: m.Listing, row: m.Image, raw: bytes, img: Image.Image,
                 category: str | None = None, **settings: object) -> ImageContext:
    """What a step sees for this listing/image row (no database: steps never get one)."""
    return ImageContext(
        image_id=row.id, listing_id=listing.id, seller_id=listing.seller_id, category=category,
        url=row.url, image=img.convert("RGB"), raw=raw, source_format="PNG", sha256=row.sha256 or "",
        settings=load_settings(**settings),
    )


def stolen_copy(img: Image.Image) -> Image.Image:
    """What a copier does: crop a strip, mirror, shrink, re-compress hard, add a frame."""
    w, h = img.size
    out = ImageOps.mirror(img.crop((0, 0, w, round(h * 0.85))))
    out = out.resize((out.width * 2 // 3, out.height * 2 // 3), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=35)
    out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return ImageOps.expand(out, border=20, fill=(255, 255, 255))


def add_flags(session: Session, count: int, kind: str = "duplicate_image") -> list[int]:
    listing = m.Listing(external_id=f"ext-{uuid.uuid4().hex[:10]}", seller_id="s", title="")
    session.add(listing)
    session.flush()
    flags = [m.Flag(listing_id=listing.id, kind=kind, score=0.9, evidence={"n": i}) for i in range(count)]
    session.add_all(flags)
    session.flush()
    return [f.id for f in flags]
