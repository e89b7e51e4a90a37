"""Tag review: reviewers' corrections written as reviewed labels (worker.labels, shared with
``catalog labels``). The reviewer is always the authenticated user."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from worker.api.deps import Reviewer, state, tx
from worker.labels import review as labels
from worker.labels.store import LabelError, LabelView, UnknownTarget

router = APIRouter(prefix="/api/v1", tags=["labels"])


class Note(BaseModel):
    note: str | None = Field(None, max_length=4000)


class CategoryBody(Note):
    category: str = Field(min_length=1, max_length=255)
    new_category: bool = Field(False, description="allow a category nobody used before")


class BoxBody(Note):
    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 in the photo's pixels")
    label: str | None = Field(None, max_length=255, description="the class (required to add a box)")


def _write(request: Request, action: Callable[[Any, int], LabelView]) -> dict[str, Any]:
    heldout = labels.heldout_percent(settings=state(request).settings)
    try:
        with tx(request) as session:
            return action(session, heldout).to_dict()
    except UnknownTarget as exc:
        raise HTTPException(404, str(exc)) from None
    except LabelError as exc:
        raise HTTPException(422, str(exc)) from None


@router.post("/images/{image_id}/tags/{name}/confirm", status_code=201, summary="The photo does show this tag")
def confirm_tag(request: Request, who: Reviewer, image_id: int, name: str, body: Note | None = None) -> dict[str, Any]:
    note = body.note if body else None
    return _write(request, lambda s, h: labels.confirm_tag(s, image_id, name, who.name, note=note, heldout=h))


@router.post("/images/{image_id}/tags/{name}/reject", status_code=201, summary="The model's tag is wrong")
def reject_tag(request: Request, who: Reviewer, image_id: int, name: str, body: Note | None = None) -> dict[str, Any]:
    note = body.note if body else None
    return _write(request, lambda s, h: labels.reject_tag(s, image_id, name, who.name, note=note, heldout=h))


@router.post("/images/{image_id}/category", status_code=201, summary="The true category of a photo")
def image_category(request: Request, who: Reviewer, image_id: int, body: CategoryBody) -> dict[str, Any]:
    return _write(request, lambda s, h: labels.set_category(
        s, body.category, who.name, image_id=image_id, new_category=body.new_category, note=body.note, heldout=h))


@router.post("/listings/{external_id}/category", status_code=201, summary="The true category of a listing")
def listing_category(request: Request, who: Reviewer, external_id: str, body: CategoryBody) -> dict[str, Any]:
    return _write(request, lambda s, h: labels.set_category(
        s, body.category, who.name, listing_external_id=external_id, new_category=body.new_category,
        note=body.note, heldout=h))


@router.post("/images/{image_id}/boxes", status_code=201, summary="Add a box the detector missed")
def add_box(request: Request, who: Reviewer, image_id: int, body: BoxBody) -> dict[str, Any]:
    if not body.label:
        raise HTTPException(422, "a new box needs a label")
    label = body.label
    return _write(request, lambda s, h: labels.add_box(s, image_id, label, body.box, who.name,
                                                       note=body.note, heldout=h))


@router.post("/detections/{detection_id}/correct", status_code=201, summary="Correct a detection's box (and class)")
def correct_box(request: Request, who: Reviewer, detection_id: int, body: BoxBody) -> dict[str, Any]:
    return _write(request, lambda s, h: labels.correct_box(s, detection_id, body.box, who.name, label=body.label,
                                                           note=body.note, heldout=h))


@router.post("/detections/{detection_id}/delete", status_code=201, summary="A detection that shows nothing")
def delete_box(request: Request, who: Reviewer, detection_id: int, body: Note | None = None) -> dict[str, Any]:
    note = body.note if body else None
    return _write(request, lambda s, h: labels.delete_box(s, detection_id, who.name, note=note, heldout=h))


@router.get("/images/{image_id}/labels", summary="Every reviewed label of a photo, with history")
def image_labels(request: Request, who: Reviewer, image_id: int) -> list[dict[str, Any]]:
    with tx(request) as session:
        return [v.to_dict() for v in labels.label_history(session, image_id=image_id)]
