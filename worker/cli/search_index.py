"""`catalog search-index rebuild|status`: the visual search index (docs/search.md)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from worker.cli.common import cli_settings, ensure_schema


@click.group("search-index")
def search_index() -> None:
    """The visual search index: which backend serves it, how many vectors it holds, rebuild.

    The backend is CATALOG_SEARCH_BACKEND: pgvector (Postgres with the vector extension),
    embedded (usearch files under CATALOG_SEARCH_DIR) or auto (pgvector when the database has
    it, else embedded)."""


def _progress(label: str) -> Any:
    if not sys.stderr.isatty():  # progress only on a terminal
        return None

    def show(done: int, total: int) -> None:
        sys.stderr.write(f"\r{label}: {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


@search_index.command("rebuild")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def rebuild_cmd(as_json: bool) -> None:
    """Rebuild the index from the database: give images analysed before visual search existed
    their vectors (from their stored tagging embedding), then, for pgvector, create what is
    missing (extension, column, HNSW indexes) and fill every empty row; for the embedded index,
    write new index files from all stored vectors. Safe while workers run."""
    from sqlalchemy.orm import Session

    from db.session import get_engine
    from worker.search.errors import SearchConfigError
    from worker.search.index import open_index
    from worker.search.pgvector import available_version
    from worker.search.pgvector import ensure_schema as ensure_pgvector
    from worker.search.vectors import pgvector_column

    settings = cli_settings()
    if settings.search_backend == "off":
        raise click.ClickException("CATALOG_SEARCH_BACKEND=off: there is no search index to rebuild.")
    ensure_schema(settings)
    engine = get_engine(settings.effective_database_url)
    with Session(engine) as session:
        if (engine.dialect.name == "postgresql" and settings.search_backend in ("auto", "pgvector")
                and not pgvector_column(session, fresh=True) and available_version(session)):
            ensure_pgvector(session)  # the extension was installed after migration 0007 ran
            session.commit()
        try:
            index = open_index(settings, session)
        except SearchConfigError as exc:
            raise click.ClickException(str(exc)) from None
        total = index.rebuild(session, _progress(f"{index.backend} index"))
        session.commit()
        health = index.health(session)
    if as_json:
        click.echo(json.dumps({"backend": index.backend, "vectors": total, "counts": health.counts,
                               "detail": health.detail}, indent=2))
    else:
        click.echo(f"{index.backend} index rebuilt: {total} vectors "
                   f"({', '.join(f'{k} {v}' for k, v in health.counts.items())})")


@search_index.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(as_json: bool) -> None:
    """Which backend serves visual search here and what it holds. Exits 1 when the index is
    behind the database (run `catalog search-index rebuild`)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from db import models as m
    from db.session import get_engine
    from worker.search.errors import SearchConfigError
    from worker.search.index import open_index

    settings = cli_settings()
    if settings.search_backend == "off":
        click.echo("visual search is off (CATALOG_SEARCH_BACKEND=off)")
        return
    ensure_schema(settings)
    with Session(get_engine(settings.effective_database_url)) as session:
        try:
            index = open_index(settings, session)
        except SearchConfigError as exc:
            raise click.ClickException(str(exc)) from None
        health = index.health(session)
        images = int(session.execute(select(func.count(func.distinct(m.SearchVector.image_id)))).scalar_one())
    report = {"backend": health.backend, "ok": health.ok, "detail": health.detail, "images": images,
              "counts": health.counts, "query_kind": settings.search_embedding, **health.extra}
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(f"backend:    {health.backend} (CATALOG_SEARCH_BACKEND={settings.search_backend})")
        click.echo(f"vectors:    {', '.join(f'{k} {v}' for k, v in health.counts.items())} ({images} images)")
        click.echo(f"queries:    {settings.search_embedding} vectors (CATALOG_SEARCH_EMBEDDING)")
        click.echo(f"state:      {'ok' if health.ok else 'BEHIND'}: {health.detail}")
    if not health.ok:
        raise SystemExit(1)
