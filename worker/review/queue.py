"""The reviewers' flag queue: list, claim (with expiry) and resolve flags.

A flag moves ``open -> claimed -> confirmed | dismissed``. A claim lasts ``ttl`` seconds; an
expired claim is claimable again, so a reviewer who walks away never blocks a flag.

Claiming is atomic on both databases:

* Postgres: ``SELECT ... FOR UPDATE SKIP LOCKED`` picks the oldest claimable flag that no
  other transaction is claiming right now, so concurrent reviewers never wait on each
  other and never get the same flag;
* SQLite: one guarded ``UPDATE ... WHERE id = (SELECT ...) RETURNING`` statement; SQLite runs
  one writer at a time, so the statement cannot interleave with another claim.

All functions work in the caller's session and transaction; the caller commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session, object_session

from db import models as m
from worker.config import Settings
from worker.labels.review import record_flag_verdict
from worker.outbound.outbox import record_listing_event
from worker.pipeline.store import lock_listing, update_fraud_score

VERDICTS = ("confirmed", "dismissed")
#: Flag kinds the fraud checks raise (worker/fraud); the queue also accepts kinds already stored.
FLAG_KINDS = ("duplicate_image", "contact_info", "nsfw", "tampered", "category_mismatch", "low_quality")


class FlagQueueError(Exception):
    """A queue operation was refused; the message says why in reviewer terms."""


class FlagNotFound(FlagQueueError):
    pass


class FlagNotHeld(FlagQueueError):
    """The reviewer tried to resolve a flag they have not claimed (or whose claim expired)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _claimable(now: datetime) -> ColumnElement[bool]:
    return or_(
        m.Flag.status == "open",
        and_(m.Flag.status == "claimed", m.Flag.claim_expires_at < now),
    )


@dataclass(frozen=True)
class FlagView:
    """A flag as a reviewer sees it (plain data, safe to use after the session closes)."""

    id: int
    listing_id: int
    image_id: int | None
    kind: str
    score: float
    status: str
    evidence: dict[str, Any]
    created_at: datetime | None
    claimed_by: str | None
    claim_expires_at: datetime | None
    reviewed_by: str | None
    reviewed_at: datetime | None
    note: str | None
    #: The shop's id of the listing: what a person reads and types (``catalog show``).
    listing_external_id: str | None = None

    @classmethod
    def of(cls, flag: m.Flag) -> FlagView:
        session = object_session(flag)
        listing = session.get(m.Listing, flag.listing_id) if session is not None else None
        return cls(flag.id, flag.listing_id, flag.image_id, flag.kind, flag.score, flag.status,
                   dict(flag.evidence or {}), _aware(flag.created_at), flag.claimed_by,
                   _aware(flag.claim_expires_at), flag.reviewed_by, _aware(flag.reviewed_at), flag.note,
                   listing.external_id if listing is not None else None)

    @property
    def claim_expired(self) -> bool:
        return self.status == "claimed" and self.claim_expires_at is not None and self.claim_expires_at <= _now()

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("created_at", "claim_expires_at", "reviewed_at"):
            out[key] = out[key].isoformat() if out[key] else None
        out["claim_expired"] = self.claim_expired
        return out


def valid_kinds(session: Session) -> list[str]:
    """The kinds a filter may name: those the fraud checks raise plus any already stored."""
    stored = session.execute(select(m.Flag.kind).distinct()).scalars()
    return sorted(set(FLAG_KINDS) | set(stored))


def check_kind(session: Session, kind: str | None) -> None:
    """Refuse an unknown kind with the list of valid ones (a typo must not read as 'no flags')."""
    if kind is not None and kind not in (kinds := valid_kinds(session)):
        raise FlagQueueError(f"unknown flag kind {kind!r}; use one of {', '.join(kinds)}")


def _priority(weights: dict[str, float]) -> ColumnElement[float]:
    return case(weights, value=m.Flag.kind, else_=0.0) * m.Flag.score


def list_flags(session: Session, *, status: str | None = None, kind: str | None = None,
               listing_id: int | None = None, limit: int = 100, offset: int = 0,
               weights: dict[str, float] | None = None, claimed_by: str | None = None) -> list[FlagView]:
    """Flags, oldest first (most serious first with ``weights``, as ``claim_next_flag`` hands
    them out). ``status='claimable'`` lists what ``claim_next_flag`` can hand out."""
    stmt = select(m.Flag)
    if status == "claimable":
        stmt = stmt.where(_claimable(_now()))
    elif status:
        if status not in m.FLAG_STATUSES:
            raise FlagQueueError(f"unknown status {status!r}; use one of "
                                 f"{', '.join(m.FLAG_STATUSES + ('claimable',))}")
        stmt = stmt.where(m.Flag.status == status)
    if kind:
        stmt = stmt.where(m.Flag.kind == kind)
    if listing_id is not None:
        stmt = stmt.where(m.Flag.listing_id == listing_id)
    if claimed_by is not None:
        stmt = stmt.where(m.Flag.claimed_by == claimed_by)
    if weights:
        stmt = stmt.order_by(_priority(weights).desc(), m.Flag.created_at, m.Flag.id)
    else:
        stmt = stmt.order_by(m.Flag.created_at, m.Flag.id)
    stmt = stmt.offset(offset).limit(limit)
    return [FlagView.of(f) for f in session.execute(stmt).scalars()]


def get_flag(session: Session, flag_id: int) -> FlagView:
    flag = session.get(m.Flag, flag_id)
    if flag is None:
        raise FlagNotFound(f"flag {flag_id} does not exist")
    return FlagView.of(flag)


def queue_stats(session: Session) -> dict[str, Any]:
    """Counts per status and per kind, how many are claimable now, and the oldest open flag."""
    now = _now()
    by_status = dict(session.execute(select(m.Flag.status, func.count()).group_by(m.Flag.status)).all())
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, n in session.execute(
            select(m.Flag.kind, m.Flag.status, func.count()).group_by(m.Flag.kind, m.Flag.status)):
        by_kind.setdefault(kind, {})[status] = n
    claimable = session.execute(select(func.count()).select_from(m.Flag).where(_claimable(now))).scalar_one()
    oldest = _aware(session.execute(select(func.min(m.Flag.created_at)).where(m.Flag.status == "open")).scalar())
    return {"by_status": {s: by_status.get(s, 0) for s in m.FLAG_STATUSES}, "by_kind": by_kind,
            "claimable": claimable, "oldest_open_at": oldest.isoformat() if oldest else None}


def reviewer_history(session: Session, reviewer: str, *, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
    """The reviewer's own decisions, newest first (rows of ``reviews``)."""
    stmt = (select(m.Review, m.Listing.external_id, m.Flag.kind)
            .join(m.Listing, m.Listing.id == m.Review.listing_id, isouter=True)
            .join(m.Flag, m.Flag.id == m.Review.flag_id, isouter=True)
            .where(m.Review.reviewer == reviewer)
            .order_by(m.Review.created_at.desc(), m.Review.id.desc()).offset(offset).limit(limit))
    out = []
    for review, external_id, kind in session.execute(stmt):
        when = _aware(review.created_at)
        out.append({"id": review.id, "flag_id": review.flag_id, "flag_kind": kind,
                    "listing_external_id": external_id, "image_id": review.image_id, "kind": review.kind,
                    "verdict": review.verdict, "label": review.label, "note": review.note,
                    "created_at": when.isoformat() if when else None})
    return out


def _claim_ttl(reviewer: str, ttl: int | float | timedelta) -> timedelta:
    """Check who claims and for how long; the TTL as a timedelta."""
    if not reviewer or not reviewer.strip():
        raise FlagQueueError("a reviewer name is required")
    ttl = ttl if isinstance(ttl, timedelta) else timedelta(seconds=float(ttl))
    if ttl.total_seconds() <= 0:
        raise FlagQueueError("the claim TTL must be positive")
    return ttl


def claim_next_flag(session: Session, reviewer: str, ttl: int | float | timedelta = 1800, *,
                    kind: str | None = None, weights: dict[str, float] | None = None) -> FlagView | None:
    """Give the next claimable flag to ``reviewer`` for ``ttl`` seconds; None if the queue
    is empty. Safe to call from many processes at once. With ``weights`` (the fraud-score
    weights per kind) the most serious flag goes first (weight x score, then oldest);
    without, the oldest."""
    ttl = _claim_ttl(reviewer, ttl)
    now = _now()
    pick = select(m.Flag.id).where(_claimable(now))
    if kind:
        pick = pick.where(m.Flag.kind == kind)
    if weights:
        pick = pick.order_by(_priority(weights).desc(), m.Flag.created_at, m.Flag.id)
    else:
        pick = pick.order_by(m.Flag.created_at, m.Flag.id)
    pick = pick.limit(1)
    values = {"status": "claimed", "claimed_by": reviewer, "claimed_at": now,
              "claim_expires_at": now + ttl}

    if session.get_bind().dialect.name == "postgresql":
        flag_id = session.execute(pick.with_for_update(skip_locked=True)).scalar_one_or_none()
        if flag_id is None:
            return None
        session.execute(update(m.Flag).where(m.Flag.id == flag_id).values(**values))
    else:
        stmt = (update(m.Flag)
                .where(m.Flag.id == pick.scalar_subquery(), _claimable(now))
                .values(**values)
                .returning(m.Flag.id))
        flag_id = session.execute(stmt).scalar_one_or_none()
        if flag_id is None:
            return None
    flag = session.get_one(m.Flag, flag_id, populate_existing=True)
    return FlagView.of(flag)


def claim_flag(session: Session, flag_id: int, reviewer: str,
               ttl: int | float | timedelta = 1800) -> FlagView:
    """Claim one specific flag for ``reviewer`` (or renew their own claim). Atomic: one guarded
    UPDATE, whose condition Postgres re-checks after waiting for a concurrent claim's row lock
    and SQLite runs alone, so two reviewers can never both hold the flag."""
    ttl = _claim_ttl(reviewer, ttl)
    now = _now()
    mine = and_(m.Flag.status == "claimed", m.Flag.claimed_by == reviewer)
    stmt = (update(m.Flag)
            .where(m.Flag.id == flag_id, or_(_claimable(now), mine))
            .values(status="claimed", claimed_by=reviewer, claimed_at=now, claim_expires_at=now + ttl)
            .returning(m.Flag.id))
    if session.execute(stmt).scalar_one_or_none() is None:
        flag = session.get(m.Flag, flag_id, populate_existing=True)
        if flag is None:
            raise FlagNotFound(f"flag {flag_id} does not exist")
        if flag.status in VERDICTS:
            raise FlagNotHeld(f"flag {flag_id} was already {flag.status} by {flag.reviewed_by}")
        expires = _aware(flag.claim_expires_at)
        raise FlagNotHeld(f"flag {flag_id} is claimed by {flag.claimed_by} until "
                          f"{expires.isoformat() if expires else 'further notice'}")
    return FlagView.of(session.get_one(m.Flag, flag_id, populate_existing=True))


def release_flag(session: Session, flag_id: int, reviewer: str) -> FlagView:
    """Give a claimed flag back to the queue without a verdict."""
    flag = _held(session, flag_id, reviewer)
    flag.status, flag.claimed_by, flag.claimed_at, flag.claim_expires_at = "open", None, None, None
    session.flush()
    return FlagView.of(flag)


def resolve_flag(session: Session, flag_id: int, reviewer: str, verdict: str,
                 note: str | None = None, *, settings: Settings) -> FlagView:
    """Record the reviewer's verdict on a flag they hold, plus a row in ``reviews``, and
    recompute the listing's fraud score with ``settings`` (a verdict overrides the model)."""
    if verdict not in VERDICTS:
        raise FlagQueueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
    # The lock order of worker.pipeline.store: the listing row first (a flag never moves to
    # another listing), then the flag. Two verdicts on one listing at the same moment are scored
    # one after the other, the second seeing the first.
    listing_id = session.execute(select(m.Flag.listing_id).where(m.Flag.id == flag_id)).scalar()
    if listing_id is None:
        raise FlagNotFound(f"flag {flag_id} does not exist")
    listing = lock_listing(session, listing_id)
    flag = _held(session, flag_id, reviewer)
    now = _now()
    flag.status = verdict
    flag.reviewed_by = reviewer
    flag.reviewed_at = now
    flag.note = note
    flag.claim_expires_at = None
    session.add(m.Review(flag_id=flag.id, listing_id=flag.listing_id, image_id=flag.image_id,
                         reviewer=reviewer, kind="flag_verdict", verdict=verdict, note=note,
                         created_at=now))
    session.flush()
    # The verdict is also a reviewed label, with the model version it corrects (training data).
    record_flag_verdict(session, flag.id, verdict, reviewer, note=note,
                        heldout=settings.label_heldout_percent)
    update_fraud_score(session, listing, settings)
    if listing.status == "done":  # the shop hears of the new decision (listing.processed, rescored)
        record_listing_event(session, listing, settings, "rescored")
    return FlagView.of(flag)


def _held(session: Session, flag_id: int, reviewer: str) -> m.Flag:
    """The flag, locked, if ``reviewer`` holds an unexpired claim on it; else a clear error."""
    flag = session.execute(
        select(m.Flag).where(m.Flag.id == flag_id).with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if flag is None:
        raise FlagNotFound(f"flag {flag_id} does not exist")
    if flag.status in VERDICTS:
        raise FlagNotHeld(f"flag {flag_id} was already {flag.status} by {flag.reviewed_by}")
    if flag.status != "claimed":
        raise FlagNotHeld(f"flag {flag_id} is {flag.status}: claim it first (flags claim)")
    if flag.claimed_by != reviewer:
        raise FlagNotHeld(f"flag {flag_id} is claimed by {flag.claimed_by}, not {reviewer}")
    expires = _aware(flag.claim_expires_at)
    if expires is not None and expires <= _now():
        raise FlagNotHeld(f"your claim on flag {flag_id} expired at {expires.isoformat()}; "
                          "claim it again")
    return flag
