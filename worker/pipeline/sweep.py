"""Find images whose task was lost, so housekeeping can announce them again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import models as m


def stale_images(session: Session, older_than: timedelta, limit: int = 1000) -> list[int]:
    """Pending images nobody has touched for a while: their task was lost (e.g. an embedded
    broker message that died with its worker). Touching them prevents re-queueing twice."""
    cutoff = datetime.now(UTC) - older_than
    rows = session.execute(
        select(m.Image).join(m.Listing)
        .where(m.Image.status == "pending", m.Image.updated_at < cutoff, m.Listing.status != "deleted")
        .order_by(m.Image.updated_at).limit(limit)
    ).scalars().all()
    for img in rows:
        img.updated_at = m.utcnow()
    return [img.id for img in rows]
