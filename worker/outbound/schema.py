"""The JSON Schema of ``listing.processed`` (published as docs/results.schema.json, printed by
``catalog events-schema --results``). Every payload is validated against it before it is
written to the outbox, so a bug is caught where the event is made, not by the shop."""

from __future__ import annotations

import functools
from typing import Any

#: Bumped on a change a consumer must know about; fields are only ever added within a version.
SCHEMA_VERSION = 1
EVENT_TYPE = "listing.processed"
REASONS = ("processed", "rescored")
DECISIONS = ("ok", "review", "hold", "incomplete")

_NULLABLE_STRING = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}


class SchemaError(ValueError):
    """A payload the code built does not match the published schema (a bug in the builder)."""


def results_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "catalog-worker listing.processed event",
        "description": "Sent when a listing finished processing (reason processed) or its fraud score was "
                       "recomputed after a review or a re-score (reason rescored). Delivered at least once: "
                       "dedupe by event_id. Fields may be added within a schema_version; ignore unknown ones.",
        "type": "object",
        "required": ["schema_version", "event_id", "type", "reason", "occurred_at", "listing", "processed_at",
                     "decision", "fraud_score", "images", "tags", "flags", "model_versions"],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "event_id": {"type": "string", "format": "uuid", "description": "Unique per event; the dedupe key."},
            "type": {"const": EVENT_TYPE},
            "reason": {"enum": list(REASONS)},
            "occurred_at": {**_TIME, "description": "When the state this event reports was committed."},
            "source_event_id": {**_NULLABLE_STRING,
                                "description": "event_id of the last listing event applied to the listing."},
            "listing": {
                "type": "object",
                "required": ["id", "internal_id", "seller_id", "category", "status"],
                "properties": {
                    "id": {"type": "string", "minLength": 1, "description": "The platform's listing id."},
                    "internal_id": {"type": "integer", "description": "listings.id in catalog-worker's database."},
                    "seller_id": {"type": "string"},
                    "category": _NULLABLE_STRING,
                    "status": {"enum": ["done", "deleted"]},
                },
            },
            "processed_at": {"type": ["string", "null"], "format": "date-time"},
            "decision": {"enum": [*DECISIONS, None]},
            "fraud_score": {"type": ["number", "null"], "minimum": 0},
            "images": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "position", "url", "status", "complete", "failure_code", "error"],
                    "properties": {
                        "id": {"type": "integer"},
                        "position": {"type": "integer", "minimum": 0},
                        "url": {"type": "string"},
                        "status": {"enum": ["pending", "done", "failed"]},
                        "complete": {"type": ["boolean", "null"],
                                     "description": "Every configured step ran ok on the image."},
                        "failure_code": {**_NULLABLE_STRING,
                                         "description": "The code of a failed image (docs/events.md table)."},
                        "error": {**_NULLABLE_STRING, "description": "'<code>: <explanation>' of a failed image."},
                    },
                },
            },
            "tags": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "score", "source", "image_id", "model_version"],
                    "properties": {
                        "name": {"type": "string"},
                        "score": {"type": "number"},
                        "source": {"type": "string"},
                        "image_id": {"type": ["integer", "null"]},
                        "model_version": {"type": "string"},
                    },
                },
            },
            "flags": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "kind", "score", "status", "image_id", "model_version"],
                    "properties": {
                        "id": {"type": "integer"},
                        "kind": {"type": "string"},
                        "score": {"type": "number", "description": "Severity, 0..1."},
                        "status": {"enum": ["open", "claimed", "confirmed", "dismissed"]},
                        "image_id": {"type": ["integer", "null"]},
                        "model_version": _NULLABLE_STRING,
                    },
                },
            },
            "model_versions": {
                "type": "object",
                "description": "Step name -> the model versions its runs on this listing's images used.",
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
            },
        },
    }


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped]

    schema = results_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def validate_payload(payload: dict[str, Any]) -> None:
    """Raise :class:`SchemaError` naming the first mismatch."""
    error = next(iter(sorted(_validator().iter_errors(payload), key=lambda e: list(e.path))), None)
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise SchemaError(f"listing.processed payload at {where}: {error.message}")
