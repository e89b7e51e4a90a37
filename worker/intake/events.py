"""The event contract producers write to the Redis stream (see docs/events.md).

Validation is strict about the listing and lenient about image references: an event whose
listing fields do not match is dead-lettered with the reason instead of being
half-processed, but an image reference the worker cannot use (``ftp://``, ``data:``, a
relative path...) is only that image's problem: it is accepted here and the image fails
with ``bad_reference`` when it is fetched, so the seller's other photos are still analysed.

Hostile payloads are bounded before the JSON parser sees them: at most
:data:`MAX_EVENT_BYTES` bytes and :data:`MAX_EVENT_DEPTH` levels of nested arrays/objects,
so no payload can exhaust the parser's recursion or the process's memory. Every string that
is stored must be text the databases accept: no NUL character, no unpaired surrogate.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

EVENT_TYPES = ("listing.created", "listing.updated", "listing.deleted")
MAX_IMAGES_PER_LISTING = 50
#: Longest image reference accepted, in characters (signed CDN URLs run to ~2 KiB).
MAX_IMAGE_REF_LENGTH = 4096
#: Largest event accepted, in bytes of UTF-8 JSON. An event that uses every field limit to
#: the full with 4-byte characters written as plain UTF-8 still fits (about 0.82 MiB).
MAX_EVENT_BYTES = 1024 * 1024
#: Deepest nesting of JSON arrays/objects accepted. A valid event needs 3
#: (event -> listing -> images); the rest leaves room for extra fields producers add.
MAX_EVENT_DEPTH = 32

# Dead-letter codes (InvalidEvent.code), documented in docs/events.md.
NO_EVENT_FIELD = "no_event_field"
TOO_LARGE = "too_large"
TOO_DEEP = "too_deep"
NOT_JSON = "not_json"
NOT_AN_OBJECT = "not_an_object"
INVALID = "invalid"
UNPARSEABLE = "unparseable"

# One token per JSON string (possessive, so an unterminated string is consumed once, to
# the end, and never re-scanned: linear time on any input) or per bracket.
_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)

_NO_NUL_PATTERN = {"pattern": "^[^\\u0000]*$"}


def printable(text: str) -> str:
    """``text`` made safe to store anywhere: NUL and unpaired surrogates are escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class InvalidEvent(ValueError):
    """The payload is not a valid event; the message says why and ``code`` says what kind
    of problem it is (one of the module's dead-letter codes)."""

    def __init__(self, message: str, code: str = INVALID) -> None:
        super().__init__(printable(message))
        self.code = code


def _storable_text(value: str) -> str:
    # Postgres rejects NUL in text, which would fail the whole event's transaction later,
    # silently. Reject it here, where the reason reaches the dead-letter stream. (Unpaired
    # surrogates, the other text no database stores, pydantic already rejects as not a string.)
    if "\x00" in value:
        raise ValueError("contains a NUL character (\\u0000), which cannot be stored")
    return value


Text = Annotated[str, AfterValidator(_storable_text), Field(json_schema_extra=_NO_NUL_PATTERN)]
ImageRef = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_IMAGE_REF_LENGTH),
    AfterValidator(_storable_text),
    Field(json_schema_extra=_NO_NUL_PATTERN),
]


class ListingPayload(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    id: Text = Field(min_length=1, max_length=255, description="The platform's listing id.")
    seller_id: Text = Field(min_length=1, max_length=255)
    title: Text = Field("", max_length=10_000)
    category: Text | None = Field(None, max_length=255)
    images: list[ImageRef] = Field(
        default_factory=list,
        max_length=MAX_IMAGES_PER_LISTING,
        description="Image references in display order: http(s):// URLs, file:// URLs or absolute "
        "paths. Any other non-empty reference is accepted, and that image alone fails with "
        "bad_reference.",
    )


class ListingEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    event_id: Text = Field(min_length=1, max_length=255, description="Unique per event; redelivery is harmless.")
    type: Literal["listing.created", "listing.updated", "listing.deleted"]
    occurred_at: datetime = Field(description="RFC 3339 timestamp with a timezone.")
    listing: ListingPayload

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (RFC 3339, e.g. 2026-11-29T12:00:00Z)")
        return value


def _check_depth_of_text(text: str) -> None:
    # Cheap path first: a document with few brackets cannot be deep (typical events have 3).
    if text.count("[") + text.count("{") <= MAX_EVENT_DEPTH:
        return
    depth = 0
    for token in _TOKENS.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            if depth > MAX_EVENT_DEPTH:
                raise InvalidEvent(f"event is nested too deeply: more than {MAX_EVENT_DEPTH} levels of "
                                   "arrays/objects", TOO_DEEP)
        elif char in "]}":
            depth -= 1


def _check_depth_of_value(value: object) -> None:
    # Iterative, so an already-built deep structure (`catalog submit`, task arguments) is
    # measured without recursing.
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth + 1 > MAX_EVENT_DEPTH:
                raise InvalidEvent(f"event is nested too deeply: more than {MAX_EVENT_DEPTH} levels of "
                                   "arrays/objects", TOO_DEEP)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _too_large(size: int) -> InvalidEvent:
    return InvalidEvent(f"event is too large: {size} bytes, the limit is {MAX_EVENT_BYTES} bytes", TOO_LARGE)


def _load(payload: str | bytes) -> Any:
    if isinstance(payload, bytes):
        if len(payload) > MAX_EVENT_BYTES:
            raise _too_large(len(payload))
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"not JSON: the payload is not UTF-8 text ({exc})", NOT_JSON) from None
    else:
        text = payload
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_EVENT_BYTES:
            raise _too_large(size)
    _check_depth_of_text(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"not JSON: {exc}", NOT_JSON) from None
    except RecursionError:  # unreachable after the depth check; kept as a last line of defence
        raise InvalidEvent("event is nested too deeply for the JSON parser", TOO_DEEP) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "event"
        cause = err.get("ctx", {}).get("error") if err["type"] == "value_error" else None
        parts.append(f"{where}: {cause if cause is not None else err['msg']}")
    return "; ".join(parts)


def parse_event(payload: str | bytes | dict[str, Any]) -> ListingEvent:
    """Parse and validate one event; raise InvalidEvent with a readable reason.

    Bounds come first (size, then nesting depth), then JSON, then the contract, so a
    hostile payload is rejected before it can cost more than a linear scan.
    """
    if isinstance(payload, (str, bytes)):
        data = _load(payload)
    else:
        data = payload
        _check_depth_of_value(data)
        size = len(json.dumps(data, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        if size > MAX_EVENT_BYTES:
            raise _too_large(size)
    if not isinstance(data, dict):
        raise InvalidEvent("event must be a JSON object", NOT_AN_OBJECT)
    try:
        return ListingEvent.model_validate(data)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc), INVALID) from None


def json_schema() -> dict[str, Any]:
    schema = ListingEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "catalog-worker listing event"
    # Limits JSON Schema cannot express; the code enforces them before validation.
    schema["description"] = (f"One listing event: at most {MAX_EVENT_BYTES} bytes of UTF-8 JSON, "
                             f"at most {MAX_EVENT_DEPTH} levels of nested arrays/objects.")
    return schema
