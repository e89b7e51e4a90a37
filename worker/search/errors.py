"""Errors of visual search, each one sentence a person can act on.

The CLI prints ``str(error)`` and exits non-zero; the API answers with ``error.status`` and
``{"error": error.code, "detail": str(error)}``. Nothing is changed by a query that fails.
"""

from __future__ import annotations


class SearchError(Exception):
    """A query that cannot be answered: unknown listing or image, an image that failed
    analysis or has no vector, ``k`` out of range, search switched off.

    ``code`` is stable (``unknown_listing``, ``unknown_image``, ``listing_deleted``,
    ``image_failed``, ``image_pending``, ``no_embedding``, ``bad_request``, ``search_off``);
    ``status`` is the HTTP status an API should answer with.
    """

    STATUS = {"unknown_listing": 404, "unknown_image": 404, "listing_deleted": 404,
              "image_failed": 409, "image_pending": 409, "no_embedding": 409,
              "bad_request": 422, "search_off": 503}

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> int:
        return self.STATUS.get(self.code, 400)


class SearchConfigError(RuntimeError):
    """The configured backend cannot work here (one sentence naming the variable): stops
    start-up of whatever opened the index."""
