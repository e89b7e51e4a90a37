"""Reliability policy shared by every task (one place, not sprinkled over tasks).

* Each task run opens its own session (``open_session``; thread-safe, so GPU workers can use
  the threads pool); the domain code opens the transactions it needs and the session is
  closed whatever happened.
* Database errors that a retry can fix (a dropped connection, a serialisation failure or an
  integrity race between two workers inserting the same row) become Celery retries with
  backoff: the task is idempotent, so running it again is always safe.
* Work discovered inside a transaction is enqueued by the caller only after commit, so no task
  ever looks for a row that was rolled back.
"""

from __future__ import annotations

import logging

from celery import Task
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from db.session import session_factory
from worker.config import Settings, get_settings

log = logging.getLogger(__name__)

RETRYABLE_DB_ERRORS = (OperationalError, IntegrityError)


class DatabaseTask(Task):
    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    max_retries = 5

    @property
    def settings(self) -> Settings:
        return get_settings()

    def open_session(self) -> Session:
        """A new session for this task run; use it as a context manager."""
        return session_factory(self.settings.effective_database_url)()

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        try:
            return super().__call__(*args, **kwargs)
        except RETRYABLE_DB_ERRORS as exc:
            if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                log.warning("database connection lost in %s; retrying", self.name)
            countdown = min(2 ** self.request.retries, 60)
            raise self.retry(exc=exc, countdown=countdown) from exc
