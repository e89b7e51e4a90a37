"""Leases: the run analysing an image holds it, and keeps saying so while it works.

When a run claims an image (``worker.pipeline.analyze``) it writes a token into
``images.lease_owner`` and a deadline ``CATALOG_LEASE_SECONDS`` ahead into
``images.lease_expires_at``; a :class:`Heartbeat` thread pushes the deadline forward every
quarter of that while the run works. The transaction that ends the run (results stored, image
failed, or handed to a retry) clears both. So, for a pending image:

=============  ================  =========================================================
lease_owner    lease_expires_at  meaning
=============  ================  =========================================================
NULL           NULL              nobody runs it: its message is queued (or was lost)
token          in the future     a live run holds it: another message for it is skipped
                                 and does not count as an attempt
token          in the past       the run died (worker killed, machine gone) or hangs: the
                                 sweep (``worker.pipeline.sweep``) re-queues the image
token          NULL              re-queued after its run died; the next claim counts that
                                 death towards ``CATALOG_MAX_ATTEMPTS``
=============  ================  =========================================================

A token reads ``<task>#<run>/<nonce>``: the message's task id (Celery keeps it across the
retries and redeliveries of one message), which run of that message (Celery's retry count),
and a random part that makes every claim's token unique. The store transaction writes only
while the image still carries its own token, so a run whose lease was taken over never writes.

Times come from the database's clock on Postgres (workers' clocks may disagree) and from this
machine's UTC clock on SQLite (one machine).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from db import models as m

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """Who runs an analysis: the message (task id) and which run of it (Celery's retries)."""

    task: str
    run: int = 0

    @classmethod
    def one_off(cls) -> Holder:
        """A holder for a run that no message stands behind (``catalog process``, tests)."""
        return cls(f"local-{os.getpid()}-{uuid.uuid4().hex[:12]}")

    def new_token(self) -> str:
        return f"{self.task}#{self.run}/{uuid.uuid4().hex[:12]}"


def token_holder(token: str) -> tuple[str, int] | None:
    """(task, run) of a token written by :meth:`Holder.new_token`; None for anything else."""
    head, sep, _nonce = token.rpartition("/")
    task, hash_sign, run = head.rpartition("#")
    if not (sep and hash_sign and task and run.isdigit()):
        return None
    return task, int(run)


@dataclass(frozen=True)
class LeaseCheck:
    busy: bool  # a live run of another message holds the image: skip, count nothing
    died: bool  # an earlier run claimed the image and never finished


def check_lease(owner: str | None, expires: datetime | None, now: datetime, holder: Holder) -> LeaseCheck:
    """What the lease an image carries means for ``holder``, who wants to claim it."""
    if owner is None:
        return LeaseCheck(busy=False, died=False)
    previous = token_holder(owner)
    if previous is not None and previous[0] == holder.task:
        # The same message again. Celery never runs one message twice at once, so its earlier
        # run is over: it handed over to a retry (an earlier run number), or it died and the
        # message was delivered again (the same run number: reject_on_worker_lost, visibility).
        return LeaseCheck(busy=False, died=previous[1] >= holder.run)
    if expires is not None and aware(expires) > now:
        return LeaseCheck(busy=True, died=False)
    return LeaseCheck(busy=False, died=True)


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def db_now(session: Session | Connection) -> datetime:
    """The time leases are measured in: the database's clock on Postgres."""
    bind = session.get_bind() if isinstance(session, Session) else session
    if bind.dialect.name == "postgresql":
        return aware(session.execute(select(func.now())).scalar_one())
    return datetime.now(UTC)


def release(session: Session, image_id: int, token: str) -> None:
    """Give the lease up without finishing the image (the run hands over to a retry). In the
    caller's transaction, which has locked the listing (the lock order)."""
    session.execute(
        update(m.Image).where(m.Image.id == image_id, m.Image.lease_owner == token)
        .values(lease_owner=None, lease_expires_at=None)
    )


def renew(engine: Engine, image_id: int | Sequence[int], token: str, seconds: int) -> bool:
    """Push the deadline ``seconds`` ahead if the lease is still ``token``'s and nobody has
    declared its run dead. One statement in its own transaction: it holds no other lock, so it
    cannot take part in a deadlock (the one exception to "listing first"). Several images (one
    run analysing a batch under one token): True while the run still holds any of them."""
    ids = [image_id] if isinstance(image_id, int) else sorted(image_id)
    with engine.begin() as conn:
        deadline = db_now(conn) + timedelta(seconds=seconds)
        done = conn.execute(
            update(m.Image)
            .where(m.Image.id.in_(ids) if len(ids) > 1 else m.Image.id == ids[0], m.Image.lease_owner == token,
                   m.Image.lease_expires_at.is_not(None), m.Image.status == "pending")
            .values(lease_expires_at=deadline)
        )
        return bool(done.rowcount)


class Heartbeat:
    """Renews one lease from a daemon thread while the ``with`` block runs.

    A renewal that fails (the database is briefly unreachable) is logged and tried again at the
    next beat; the lease only runs out if renewals fail for a whole ``CATALOG_LEASE_SECONDS``.
    When the lease is no longer the run's (the image changed, or a sweep declared the run dead)
    the heartbeat stops; the store transaction then refuses the run's results.
    """

    def __init__(self, engine: Engine, image_id: int | Sequence[int], token: str, lease_seconds: int) -> None:
        self.engine, self.image_id, self.token = engine, image_id, token
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 4
        self.renewals = 0
        self.lost = False
        self._stop = threading.Event()
        first = image_id if isinstance(image_id, int) else min(image_id, default=0)
        self._thread = threading.Thread(target=self._beat, name=f"lease-{first}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        # Not waiting long for a renewal stuck on an unreachable database: one that lands late
        # changes nothing, it renews only while the image still carries this run's token.
        self._thread.join(timeout=1.0)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                still_ours = renew(self.engine, self.image_id, self.token, self.lease_seconds)
            except SQLAlchemyError as exc:
                log.warning("image %s: could not renew its lease (trying again in %.0f s): %s",
                            self.image_id, self.interval, exc)
                continue
            if not still_ours:
                self.lost = True
                log.warning("image %s: its lease is no longer held by this run (the image changed, or "
                            "the run was declared dead); its results will not be stored", self.image_id)
                return
            self.renewals += 1


def engine_of(session: Session) -> Engine:
    """The engine behind a session (bound to an engine, or to a connection in tests)."""
    bind: Any = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine
