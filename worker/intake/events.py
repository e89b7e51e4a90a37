"""The event contract producers write to the Redis stream (see docs/events.md).

Validation is strict: an event that does not match is dead-lettered with the reason
instead of being half-processed.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

EVENT_TYPES = ("listing.created", "listing.updated", "listing.deleted")
MAX_IMAGES_PER_LISTING = 50


class InvalidEvent(ValueError):
    """The payload is not a valid event; the message says why."""


class ListingPayload(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=255, description="The platform's listing id.")
    seller_id: str = Field(min_length=1, max_length=255)
    title: str = Field("", max_length=10_000)
    category: str | None = Field(None, max_length=255)
    images: list[str] = Field(
        default_factory=list,
        max_length=MAX_IMAGES_PER_LISTING,
        description="http(s):// URLs, file:// URLs or absolute paths, in display order.",
    )

    @field_validator("images")
    @classmethod
    def _image_refs(cls, refs: list[str]) -> list[str]:
        for ref in refs:
            if not (ref.startswith(("http://", "https://", "file://")) or os.path.isabs(ref)):
                raise ValueError(f"image reference {ref!r} is not an http(s):// or file:// URL or an absolute path")
        return refs


class ListingEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    event_id: str = Field(min_length=1, max_length=255, description="Unique per event; redelivery is harmless.")
    type: Literal["listing.created", "listing.updated", "listing.deleted"]
    occurred_at: datetime = Field(description="RFC 3339 timestamp with a timezone.")
    listing: ListingPayload

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (RFC 3339, e.g. 2026-11-29T12:00:00Z)")
        return value


def parse_event(payload: str | bytes | dict[str, Any]) -> ListingEvent:
    """Parse and validate one event; raise InvalidEvent with a readable reason."""
    try:
        data = json.loads(payload) if isinstance(payload, (str, bytes)) else payload
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent("event must be a JSON object")
    try:
        return ListingEvent.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "event"
            parts.append(f"{where}: {err['msg']}")
        raise InvalidEvent("; ".join(parts)) from None


def json_schema() -> dict[str, Any]:
    schema = ListingEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "catalog-worker listing event"
    return schema
