"""`catalog`: the one command-line entry point for every process of the system."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from pydantic import SecretStr

from worker.cli.common import cli_settings, connection_sentence, debug_enabled, setup_logging
from worker.config import ENV_PREFIX, Settings, redact_url


class CatalogGroup(click.Group):
    """The `catalog` group: a server that cannot be reached ends any command with one
    sentence naming it and its variable (the traceback only with --debug or a DEBUG log level)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            sentence = None if isinstance(exc, click.ClickException) else connection_sentence(exc)
            if sentence is None or debug_enabled():
                raise
            raise click.ClickException(sentence + " (catalog --debug shows the traceback)") from None


@click.group(cls=CatalogGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="catalog-worker")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-sentence errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """catalog-worker: analyse e-commerce listing photos from events.

    \b
    Embedded mode (default, no servers):  catalog process ./photos   or   catalog demo
    Production:  CATALOG_DATABASE_URL=postgresql+psycopg2://...  CATALOG_BROKER_URL=redis://...
                 catalog db upgrade; catalog ingest; catalog worker; catalog beat

    Every setting is an environment variable with the CATALOG_ prefix: see `catalog config`.
    Secrets can be read from files: CATALOG_DATABASE_URL_FILE, CATALOG_BROKER_URL_FILE,
    CATALOG_REDIS_URL_FILE, CATALOG_API_SECRET_FILE.
    """
    ctx.ensure_object(dict)["debug"] = debug


@main.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def config_cmd(as_json: bool) -> None:
    """Show every setting, its environment variable and its effective value."""
    settings = cli_settings()
    rows = []
    for name, field in Settings.model_fields.items():
        rows.append((f"{ENV_PREFIX}{name.upper()}", _shown(getattr(settings, name)), field.description or ""))
    derived = {
        "database": redact_url(settings.effective_database_url),
        "broker": redact_url(settings.effective_broker_url),
        "redis (events)": redact_url(settings.effective_redis_url),
        "artifacts": str(settings.effective_artifact_dir),
    }
    if as_json:
        click.echo(json.dumps({"settings": {k: v for k, v, _ in rows}, "effective": derived}, indent=2))
        return
    for env, value, desc in rows:
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        click.echo(f"{env:34} = {text:40} {desc}")
    click.echo("\neffective:")
    for key, value in derived.items():
        click.echo(f"  {key:15} {value}")


def _shown(value: Any) -> Any:
    """A setting as JSON-ready data with its secrets masked: a SecretStr as ``**********``,
    URL passwords as ``***``; paths as text, lists and numbers as themselves."""
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _shown(v) for k, v in value.items()}
    return value


@main.group("db")
def db_group() -> None:
    """Database schema (Alembic migrations; the only way the schema changes)."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION. Safe to run repeatedly and from several hosts at once
    (Postgres: an advisory lock serialises concurrent runs)."""
    from db.migrate import current_revision, upgrade

    settings = cli_settings()
    setup_logging(settings)
    url = settings.effective_database_url
    before = current_revision(url)
    upgrade(url, revision)
    after = current_revision(url)
    if before == after:
        click.echo(f"database already at {after}")
    else:
        click.echo(f"database migrated from {before or 'empty'} to {after}")


@db_group.command("current")
def db_current() -> None:
    """Print the schema revision of the database and the one this code expects."""
    from db.migrate import current_revision, head_revision

    url = cli_settings().effective_database_url
    click.echo(f"database: {current_revision(url) or 'empty'}\ncode:     {head_revision(url)}")


@db_group.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (e.g. `base` drops everything)."""
    from db.migrate import downgrade

    downgrade(cli_settings().effective_database_url, revision)
    click.echo(f"downgraded to {revision}")


@main.command("events-schema")
@click.option("--results", is_flag=True,
              help="Print the schema of the listing.processed events catalog-worker publishes instead "
              "(docs/results.schema.json).")
def events_schema_cmd(results: bool) -> None:
    """Print the JSON Schema of listing events (docs/events.schema.json)."""
    if results:
        from worker.outbound.schema import results_schema

        click.echo(json.dumps(results_schema(), indent=2))
        return
    from worker.intake.events import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


from worker.cli import api, backfill, flags, health, labels, local, models, retrain, services, train, users  # noqa: E402  (commands register below)

for _command in (services.ingest_cmd, services.submit_cmd, services.worker_cmd, services.beat_cmd,
                 local.process_cmd, local.show_cmd, local.status_cmd, local.demo_cmd,
                 flags.flags, models.models, train.train, api.api_cmd, users.users, labels.labels_group,
                 retrain.retrain_cmd, backfill.backfill_cmd):
    main.add_command(_command)
main.add_command(health.health)
from worker.cli import search as search_cli  # noqa: E402  (visual and tag search)

main.add_command(search_cli.search_cmd)
main.add_command(search_cli.similar_cmd)
from worker.cli import search_index as search_index_cli  # noqa: E402  (visual search index)

main.add_command(search_index_cli.search_index)
