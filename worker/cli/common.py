"""What every command shares: settings (a bad value is a one-line error), logging, schema check.
"""

from __future__ import annotations

import logging
import os
import time

import click

from worker.config import ENV_PREFIX, ConfigError, Settings, get_settings, redact_url

log = logging.getLogger("catalog")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def setup_logging(settings: Settings) -> None:
    """CATALOG_LOG_LEVEL and CATALOG_LOG_FORMAT (text or JSON lines), see worker/observe/logs.py."""
    from worker.observe.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def cli_settings() -> Settings:
    from worker.pipeline.registry import validate_steps

    try:
        settings = get_settings()
        validate_steps(settings.steps)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # an unknown step name
        raise click.ClickException(f"{ENV_PREFIX}STEPS: {exc}") from None
    return settings


def debug_enabled() -> bool:
    """Whether errors keep their traceback: ``catalog --debug`` or CATALOG_LOG_LEVEL=DEBUG."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and (ctx.find_root().obj or {}).get("debug"):
        return True
    return os.environ.get(f"{ENV_PREFIX}LOG_LEVEL", "").strip().upper() == "DEBUG"


def _reason(exc: BaseException) -> str:
    """The first line of the driver's own message (psycopg2 adds hints on further lines)."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0].strip()


def connection_sentence(exc: BaseException) -> str | None:
    """One sentence naming the server that could not be used and its variable, or None when
    ``exc`` is not a connection problem (then the traceback is the useful report)."""
    import kombu.exceptions
    import redis
    import sqlalchemy.exc

    try:
        settings: Settings | None = get_settings()
    except ConfigError:
        settings = None
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        url = redact_url(settings.effective_database_url) if settings else "?"
        return (f"cannot use the database {url} (CATALOG_DATABASE_URL): {_reason(exc)}; is the server "
                "running and the URL right?")
    if isinstance(exc, kombu.exceptions.OperationalError):
        url = redact_url(settings.effective_broker_url) if settings else "?"
        return f"cannot reach the broker {url} (CATALOG_BROKER_URL): {_reason(exc)}"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError)):
        url = redact_url(settings.effective_redis_url) if settings else "?"
        return (f"cannot reach Redis at {url} (CATALOG_REDIS_URL, default the redis:// broker URL): "
                f"{_reason(exc)}")
    return None


def wait_for_database(settings: Settings, every: float = 5.0) -> None:
    """Wait up to CATALOG_DB_RETRY_FOR seconds for the database to accept a connection (a
    worker started with, or just before, its database), logging every ``every`` seconds;
    then a one-sentence error."""
    import sqlalchemy.exc
    from sqlalchemy import text

    from db.session import get_engine

    url = settings.effective_database_url
    deadline = time.monotonic() + settings.db_retry_for
    next_log = 0.0
    while True:
        try:
            with get_engine(url).connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            now = time.monotonic()
            if now >= deadline:
                if debug_enabled():
                    raise
                raise click.ClickException(
                    f"{connection_sentence(exc)} (waited {settings.db_retry_for} s, "
                    f"{ENV_PREFIX}DB_RETRY_FOR)") from None
            if now >= next_log:
                log.warning("waiting for the database %s: %s", redact_url(url), _reason(exc))
                next_log = now + every
            time.sleep(min(1.0, max(0.0, deadline - now)))


def ensure_schema(settings: Settings) -> None:
    """The embedded SQLite database migrates itself; Postgres is migrated by an operator
    (`catalog db upgrade`) so that many workers never race to change a production schema."""
    from db.migrate import current_revision, head_revision, upgrade

    url = settings.effective_database_url
    current, head = current_revision(url), head_revision(url)
    if current == head:
        return
    if url.startswith("sqlite"):
        log.info("migrating embedded database %s to %s", redact_url(url), head)
        upgrade(url)
        return
    raise click.ClickException(
        f"database schema is at {current or 'nothing'}, this code needs {head}: run `catalog db upgrade`"
    )


def allow_local(settings: Settings, paths: list[str]) -> Settings:
    """``settings`` that may also read ``paths`` (resolved files or folders) besides the
    directories in CATALOG_FETCH_ALLOW_DIRS."""
    extra = [p for p in paths if p not in settings.fetch_allow_dirs]
    if not extra:
        return settings
    return settings.model_copy(update={"fetch_allow_dirs": [*settings.fetch_allow_dirs, *extra]})
