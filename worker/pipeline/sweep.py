"""Find pending images that nobody will finish, so they can be announced again.

Two kinds (see the table in ``worker.pipeline.lease``):

* :func:`requeue_expired_leases`: the run analysing the image stopped renewing its lease (its
  worker was killed, its machine vanished, it hangs). Every ``catalog worker`` runs this every
  ``CATALOG_LEASE_SWEEP_SECONDS`` (and beat does too), so such an image is announced again
  within ``CATALOG_LEASE_SECONDS`` + that interval of its last renewal: minutes, not the
  broker's visibility timeout (hours).
* :func:`stale_images`: pending, no run ever held it (or its re-announcement was lost too), and
  untouched for ``CATALOG_STALE_AFTER``: its message was lost (e.g. an embedded-broker message
  that died with its worker).

Both mark what they return in the same transaction (a re-queued expired lease loses its
deadline but keeps the dead run's token, so the next claim counts that death; a stale image is
touched), and lock the listing rows first, then the images, skipping rows another transaction
holds: two sweeps at the same moment never return the same image, and a sweep never waits. The
caller announces the ids after commit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import models as m
from db.session import make_engine
from worker.config import Settings
from worker.pipeline.lease import db_now

log = logging.getLogger(__name__)


def requeue_expired_leases(session: Session, limit: int = 1000) -> list[int]:
    """Pending images whose lease ran out; marked as re-queued (deadline cleared)."""
    now = db_now(session)
    expired = (m.Image.status == "pending") & (m.Image.lease_expires_at < now)
    return _take(session, expired, {"lease_expires_at": None}, limit)


def stale_images(session: Session, older_than: timedelta, limit: int = 1000) -> list[int]:
    """Pending images no live or dead run holds a deadline on, untouched for ``older_than``:
    their task was lost. Touching them prevents re-queueing twice."""
    cutoff = datetime.now(UTC) - older_than
    stale = ((m.Image.status == "pending") & m.Image.lease_expires_at.is_(None)
             & (m.Image.updated_at < cutoff))
    return _take(session, stale, {}, limit)


def _take(session: Session, condition: ColumnElement[bool], values: dict[str, Any], limit: int) -> list[int]:
    """Lock (listing first, then image; SKIP LOCKED) and mark up to ``limit`` images matching
    ``condition``; return their ids, oldest first."""
    found = session.execute(
        select(m.Image.id, m.Image.listing_id).join(m.Listing, m.Listing.id == m.Image.listing_id)
        .where(condition, m.Listing.status != "deleted")
        .order_by(m.Image.updated_at, m.Image.id).limit(limit)
    ).all()
    if not found:
        return []
    listings = session.execute(
        select(m.Listing.id).where(m.Listing.id.in_({row.listing_id for row in found}),
                                   m.Listing.status != "deleted")
        .order_by(m.Listing.id).with_for_update(skip_locked=True)
    ).scalars().all()
    ids = session.execute(
        select(m.Image.id).where(m.Image.id.in_([row.id for row in found]),
                                 m.Image.listing_id.in_(listings), condition)
        .order_by(m.Image.updated_at, m.Image.id).with_for_update(skip_locked=True)
    ).scalars().all()
    if ids:
        session.execute(update(m.Image).where(m.Image.id.in_(ids)).values(updated_at=m.utcnow(), **values))
    return list(ids)


def sweep_once(session: Session, settings: Settings) -> list[int]:
    """Both sweeps, each in its own short transaction; the ids to announce (after commit)."""
    with session.begin():
        expired = requeue_expired_leases(session)
    with session.begin():
        stale = stale_images(session, timedelta(seconds=settings.stale_after))
    if expired:
        log.warning("re-queued %d image(s) whose run stopped renewing its lease (its worker died or "
                    "hangs): %s", len(expired), _ids(expired))
    if stale:
        log.warning("re-queued %d image(s) pending for over %d s with no run (message lost): %s",
                    len(stale), settings.stale_after, _ids(stale))
    return expired + stale


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:20])) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


class Sweeper:
    """Runs :func:`sweep_once` every ``CATALOG_LEASE_SWEEP_SECONDS`` in a daemon thread and
    hands each id to ``announce`` (started by every ``catalog worker``'s main process).

    It uses an engine of its own and closes its connections after every sweep, so a pool
    process forked meanwhile never inherits an open database socket; a failed sweep (database
    or broker down) is logged and tried again at the next interval.
    """

    def __init__(self, settings: Settings, announce: Callable[[int], object]) -> None:
        self.settings, self.announce = settings, announce
        self.sweeps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catalog-lease-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        engine = make_engine(self.settings.effective_database_url)
        factory = sessionmaker(engine, expire_on_commit=False)
        delay = 0.0  # a (re)started worker sweeps at once: that is when a dead one is likely
        while not self._stop.wait(delay):
            delay = float(self.settings.lease_sweep_seconds)
            try:
                with factory() as session:
                    ids = sweep_once(session, self.settings)
                for image_id in ids:
                    self.announce(image_id)
            except Exception as exc:  # noqa: BLE001 - keep sweeping; the next run retries
                log.warning("lease sweep failed (next in %.0f s): %s: %s", delay, type(exc).__name__, exc)
            finally:
                engine.dispose()
                self.sweeps += 1
