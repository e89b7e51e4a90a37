"""The fraud-flag queue over HTTP: the same functions as ``catalog flags`` (worker.review.queue).

The reviewer is always the authenticated user: a client cannot claim or decide in someone
else's name."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from worker.api.deps import Paging, Reviewer, state, tx
from worker.fraud.champion import fraud_weights
from worker.review import queue

router = APIRouter(prefix="/api/v1", tags=["flags"])

StatusFilter = Literal["open", "claimed", "confirmed", "dismissed", "claimable"]


class ClaimBody(BaseModel):
    kind: str | None = Field(None, description="only a flag of this kind")
    ttl: int | None = Field(None, ge=10, le=86_400, description="seconds to hold the claim "
                            "[default: CATALOG_FLAG_CLAIM_TTL]")


class ResolveBody(BaseModel):
    verdict: Literal["confirmed", "dismissed"]
    note: str | None = Field(None, max_length=4000)


def queue_error(exc: queue.FlagQueueError) -> HTTPException:
    if isinstance(exc, queue.FlagNotFound):
        return HTTPException(404, str(exc))
    if isinstance(exc, queue.FlagNotHeld):
        return HTTPException(409, str(exc))
    return HTTPException(422, str(exc))


@router.get("/flags", summary="Flags with filters; most serious first, or oldest first")
def list_flags(request: Request, who: Reviewer, paging: Paging,
               status: StatusFilter | None = None, kind: str | None = None,
               mine: Annotated[bool, Query(description="only flags I claimed")] = False,
               order: Literal["severity", "oldest"] = "severity") -> dict[str, Any]:
    weights = fraud_weights(state(request).settings).weights if order == "severity" else None
    try:
        with tx(request) as session:
            queue.check_kind(session, kind)
            items = queue.list_flags(session, status=status, kind=kind, limit=paging.page_size,
                                     offset=paging.offset, weights=weights,
                                     claimed_by=who.name if mine else None)
    except queue.FlagQueueError as exc:
        raise queue_error(exc) from None
    return {"items": [f.to_dict() for f in items], "page": paging.page, "page_size": paging.page_size}


@router.get("/flags/stats", summary="Queue statistics: counts per status and kind, claimable, oldest open")
def flag_stats(request: Request, who: Reviewer) -> dict[str, Any]:
    with tx(request) as session:
        return queue.queue_stats(session)


@router.get("/flags/{flag_id}", summary="One flag with its evidence")
def get_flag(request: Request, who: Reviewer, flag_id: int) -> dict[str, Any]:
    try:
        with tx(request) as session:
            return queue.get_flag(session, flag_id).to_dict()
    except queue.FlagQueueError as exc:
        raise queue_error(exc) from None


@router.post("/flags/claim", summary="Claim the next flag (most serious first), optionally of one kind",
             responses={204: {"description": "the queue is empty"}})
def claim_next(request: Request, who: Reviewer, body: ClaimBody | None = None) -> Any:
    body = body or ClaimBody()
    settings = state(request).settings
    try:
        with tx(request) as session:
            queue.check_kind(session, body.kind)
            flag = queue.claim_next_flag(session, who.name, body.ttl or settings.flag_claim_ttl,
                                         kind=body.kind, weights=fraud_weights(settings).weights)
    except queue.FlagQueueError as exc:
        raise queue_error(exc) from None
    if flag is None:
        return Response(status_code=204)
    return flag.to_dict()


@router.post("/flags/{flag_id}/claim", summary="Claim one specific flag (409 when someone else holds it)")
def claim_one(request: Request, who: Reviewer, flag_id: int, body: ClaimBody | None = None) -> dict[str, Any]:
    ttl = (body.ttl if body else None) or state(request).settings.flag_claim_ttl
    try:
        with tx(request) as session:
            return queue.claim_flag(session, flag_id, who.name, ttl).to_dict()
    except queue.FlagQueueError as exc:
        raise queue_error(exc) from None


@router.post("/flags/{flag_id}/resolve", summary="Confirm or dismiss a flag you hold, with a note")
def resolve(request: Request, who: Reviewer, flag_id: int, body: ResolveBody) -> dict[str, Any]:
    try:
        with tx(request) as session:
            return queue.resolve_flag(session, flag_id, who.name, body.verdict, body.note,
                                      settings=state(request).settings).to_dict()
    except queue.FlagQueueError as exc:
        raise queue_error(exc) from None


@router.post("/flags/{flag_id}/release", summary="Give a flag you hold back to the queue")
def release(request: Request, who: Reviewer, flag_id: int) -> dict[str, Any]:
    try:
        with tx(request) as session:
            return queue.release_flag(session, flag_id, who.name).to_dict()
    except queue.FlagQueueError as exc:
        raise queue_error(exc) from None


@router.get("/me/history", summary="My own decisions, newest first")
def my_history(request: Request, who: Reviewer, paging: Paging) -> dict[str, Any]:
    with tx(request) as session:
        items = queue.reviewer_history(session, who.name, limit=paging.page_size, offset=paging.offset)
    return {"user": who.name, "role": who.role, "items": items, "page": paging.page,
            "page_size": paging.page_size}
