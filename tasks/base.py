"""Reliability policy shared by every task (one place, not sprinkled over tasks).

* Each task run opens its own session (``open_session``; thread-safe, so GPU workers can use
  the threads pool); the domain code opens the transactions it needs and the session is
  closed whatever happened.
* Database errors become Celery retries through Celery's own ``autoretry_for`` with
  exponential backoff and full jitter (``retry_backoff``/``retry_backoff_max``/``retry_jitter``):
  1, 2, 4 ... s, at most ``DB_BACKOFF_MAX`` s apart, each delay drawn at random below that bound
  so that workers coming back after an outage do not hammer the database in step. Tasks are
  idempotent, so running one again is always safe.
* **The database being unreachable never drops a task quickly**: such errors are retried for
  ``CATALOG_DB_RETRY_FOR`` seconds (default 15 min), measured from the first failure of the
  current outage, however many retries that takes. Only after that the task fails (and is
  acknowledged); an image it leaves pending is re-queued by the stale sweep.
  Integrity races between two workers inserting the same row are retried ``max_retries`` times.
* Work discovered inside a transaction is enqueued by the caller only after commit, so no task
  ever looks for a row that was rolled back.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import Retry
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from db.session import session_factory
from worker.config import Settings, get_settings

log = logging.getLogger(__name__)

#: The database is down, restarting, unreachable, or rolled us back (deadlock, serialisation).
DB_UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
RETRYABLE_DB_ERRORS: tuple[type[Exception], ...] = (*DB_UNAVAILABLE, IntegrityError)
#: Longest delay between two retries, seconds.
DB_BACKOFF_MAX = 60
#: Message header carried from retry to retry during an outage:
#: "<unix time of the first failure> <retries of the message it was written for> <db retries so far>".
OUTAGE_HEADER = "catalog_db_outage"


class DatabaseTask(Task[Any, Any]):
    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    autoretry_for = RETRYABLE_DB_ERRORS
    retry_backoff = 1
    retry_backoff_max = DB_BACKOFF_MAX
    retry_jitter = True
    max_retries = 5  # integrity races; unavailability is bounded by time, not by this count

    @property
    def settings(self) -> Settings:
        return get_settings()

    def open_session(self) -> Session:
        """A new session for this task run; use it as a context manager."""
        return session_factory(self.settings.effective_database_url)()

    @property
    def work_retries(self) -> int:
        """Retries of this message that were not caused by the database (e.g. a slow image
        host): a long outage must not use up the task's own retry budget."""
        return self.request.retries - _outage(self.request.headers, self.request.retries)[2]

    def retry(
        self, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None,
        exc: Exception | None = None, throw: bool = True, eta: datetime | None = None,
        countdown: float | None = None, max_retries: int | None = None, **options: Any,
    ) -> Retry:
        """Celery's retry, with the time-bounded policy for an unreachable database."""
        if isinstance(exc, DB_UNAVAILABLE):
            max_retries, options["headers"] = self._outage_policy(exc)
        try:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        finally:
            # Celery leaves an explicit max_retries on the (process-wide) task object when retry
            # raises; autoretry would apply it to the next, unrelated failure.
            self.__dict__.pop("override_max_retries", None)

    def _outage_policy(self, exc: Exception) -> tuple[int, dict[str, str]]:
        """(max_retries, headers) for this retry: keep going while the outage is younger than
        CATALOG_DB_RETRY_FOR, then let Celery give up (it re-raises ``exc``)."""
        request = self.request
        since, _at, db_retries = _outage(request.headers, request.retries)
        waited = time.time() - since
        limit = self.settings.db_retry_for
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            log.warning("database connection lost in %s", self.name)
        headers = dict(request.headers or {})
        if waited >= limit:
            log.error("%s: database unavailable for %.0f s (CATALOG_DB_RETRY_FOR=%d); giving up: %s",
                      self.name, waited, limit, exc)
            return request.retries, headers
        log.warning("%s: database unavailable for %.0f s, retry %d: %s", self.name, waited,
                    request.retries + 1, exc)
        headers[OUTAGE_HEADER] = f"{since:.3f} {request.retries + 1} {db_retries + 1}"
        return request.retries + 1, headers


def _outage(headers: dict[str, Any] | None, retries: int) -> tuple[float, int, int]:
    """(first failure time, retries it was written for, database retries so far) from the
    message headers. A stamp written for another delivery (a retry for some other reason came
    in between) starts a new outage now but keeps counting database retries."""
    now = time.time()
    try:
        since_text, at_text, count_text = str((headers or {})[OUTAGE_HEADER]).split()
        since, at, count = float(since_text), int(at_text), int(count_text)
    except (KeyError, ValueError):
        return now, retries, 0
    return (since if at == retries else now), at, count
