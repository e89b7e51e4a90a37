"""What every command shares: settings (a bad value is a one-line error), logging, schema check.
"""

from __future__ import annotations

import logging
import sys

import click

from worker.config import ENV_PREFIX, ConfigError, Settings, get_settings

log = logging.getLogger("catalog")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.log_level != "DEBUG":
        # Migration chatter and kombu's note about the host-less filesystem URL are noise here.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)


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


def ensure_schema(settings: Settings) -> None:
    """The embedded SQLite database migrates itself; Postgres is migrated by an operator
    (`catalog db upgrade`) so that many workers never race to change a production schema."""
    from db.migrate import current_revision, head_revision, upgrade

    url = settings.effective_database_url
    current, head = current_revision(url), head_revision(url)
    if current == head:
        return
    if url.startswith("sqlite"):
        log.info("migrating embedded database %s to %s", url, head)
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
