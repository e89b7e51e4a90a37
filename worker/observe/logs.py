"""Log set-up for every `catalog` process: text or JSON lines (CATALOG_LOG_FORMAT).

JSON lines carry the stable keys ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger`` and ``msg``, plus every structured field a call passes with ``extra=`` (e.g.
``event_id``, ``listing``, ``image_id``, ``status``, ``duration_ms``) and ``exc`` for a
traceback. Celery replaces handlers and formatters of its own loggers when a worker (and each
prefork child) starts; the ``after_setup_logger`` / ``after_setup_task_logger`` hooks put the
configured format back on them, so the format holds in pool children too.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName", "color_message"}  # color_message: uvicorn's ANSI twin of msg
#: Marks the handler this module installed on the root logger.
_OURS = "_catalog_handler"

_format: LogFormat = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: LogFormat | None = None) -> logging.Formatter:
    return JsonFormatter() if (fmt or _format) == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, fmt: LogFormat = "text") -> None:
    """Log ``level`` and above to stderr in ``fmt``. Idempotent; a root logger that someone
    else configured first (a test runner's capture) keeps its handlers."""
    global _format
    _format = fmt
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _OURS, False)]
    if ours:
        for handler in ours:
            handler.setFormatter(formatter(fmt))
        root.setLevel(level)
    elif not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        setattr(handler, _OURS, True)
        handler.setFormatter(formatter(fmt))
        root.addHandler(handler)
        root.setLevel(level)
    if fmt == "json":
        # Python warnings (Celery's superuser warning, deprecations) become log lines too, so
        # that every line of the process is JSON.
        logging.captureWarnings(True)
    if level != "DEBUG":
        # Migration chatter and kombu's note about the host-less filesystem URL are noise here.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)


def install_celery_hooks() -> None:
    """Keep the configured format on the loggers Celery sets up (in the worker and in every
    pool child it starts)."""
    from celery.signals import after_setup_logger, after_setup_task_logger

    after_setup_logger.connect(_reformat, weak=False)
    after_setup_task_logger.connect(_reformat, weak=False)


def celery_arguments(fmt: LogFormat, command: str, args: list[str]) -> list[str]:
    """The ``celery`` command line for ``command`` (worker, beat): the hooks that keep ``fmt``
    in Celery's loggers are installed, and with JSON logs its ASCII-art banner on stdout is
    left out (``--quiet``), so that every line is one JSON object."""
    install_celery_hooks()
    return [*(["--quiet"] if fmt == "json" else []), command, *args]


def _reformat(logger: logging.Logger | None = None, **_kwargs: Any) -> None:
    if logger is None:
        return
    for handler in logger.handlers:
        handler.setFormatter(formatter())
