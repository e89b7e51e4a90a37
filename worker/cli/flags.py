"""`catalog flags ...`: the reviewers' queue on the command line.

    catalog flags list [--status open|claimed|confirmed|dismissed|claimable] [--kind KIND] [--json]
    catalog flags claim --reviewer NAME [--ttl SECONDS] [--kind KIND] [--json]
    catalog flags resolve FLAG_ID --reviewer NAME --verdict confirmed|dismissed [--note TEXT]
    catalog flags release FLAG_ID --reviewer NAME

The group is attached to the main CLI by ``worker.cli``; it can also run alone
(``python -m worker.cli_flags``).
"""

from __future__ import annotations

import json

import click

from db.session import transaction
from worker.config import get_settings
from worker.review import queue


def _url() -> str:
    return get_settings().effective_database_url


def _line(flag: queue.FlagView) -> str:
    summary = flag.evidence.get("summary") or ""
    holder = ""
    if flag.status == "claimed":
        holder = f" by {flag.claimed_by}" + (" (expired)" if flag.claim_expired else
                                             f" until {flag.claim_expires_at:%H:%M:%S}")
    elif flag.reviewed_by:
        holder = f" by {flag.reviewed_by}"
    return (f"#{flag.id:<6} {flag.kind:<18} {flag.score:5.2f}  {flag.status}{holder}  "
            f"listing {flag.listing_id} image {flag.image_id}  {summary}").rstrip()


def _check_schema() -> None:
    """Same policy as the main CLI: the embedded SQLite file migrates itself, Postgres must
    be migrated by an operator first."""
    from db.migrate import current_revision, head_revision, upgrade

    url = _url()
    current, head = current_revision(url), head_revision(url)
    if current == head:
        return
    if url.startswith("sqlite"):
        upgrade(url)
        return
    raise click.ClickException(
        f"database schema is at {current or 'nothing'}, this code needs {head}: run `catalog db upgrade`")


@click.group("flags")
def flags() -> None:
    """Review fraud flags: list them, claim the next one, record a verdict."""
    _check_schema()


@flags.command("list")
@click.option("--status", type=click.Choice(list(queue.m.FLAG_STATUSES) + ["claimable"]), default=None)
@click.option("--kind", default=None, help="duplicate_image, contact_info, nsfw, tampered, ...")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one array).")
def list_cmd(status: str | None, kind: str | None, limit: int, as_json: bool) -> None:
    """List flags, oldest first."""
    with transaction(_url()) as session:
        items = queue.list_flags(session, status=status, kind=kind, limit=limit)
    if as_json:
        click.echo(json.dumps([f.to_dict() for f in items], indent=2, default=str))
        return
    if not items:
        click.echo("no flags")
    for flag in items:
        click.echo(_line(flag))


@flags.command("claim")
@click.option("--reviewer", required=True)
@click.option("--ttl", type=int, default=None, help="Seconds to hold the claim [default: CATALOG_FLAG_CLAIM_TTL]")
@click.option("--kind", default=None, help="Only claim flags of this kind.")
@click.option("--json", "as_json", is_flag=True)
def claim_cmd(reviewer: str, ttl: int | None, kind: str | None, as_json: bool) -> None:
    """Claim the most serious open (or expired) flag: fraud weight of its kind x score, then oldest."""
    ttl = ttl if ttl is not None else get_settings().flag_claim_ttl
    try:
        with transaction(_url()) as session:
            flag = queue.claim_next_flag(session, reviewer, ttl, kind=kind,
                                         weights=get_settings().fraud_weights)
    except queue.FlagQueueError as exc:
        raise click.ClickException(str(exc)) from None
    if flag is None:
        click.echo("null" if as_json else "the queue is empty")
        return
    if as_json:
        click.echo(json.dumps(flag.to_dict(), indent=2, default=str))
        return
    click.echo(_line(flag))
    click.echo(json.dumps(flag.evidence, indent=2, default=str))


@flags.command("resolve")
@click.argument("flag_id", type=int)
@click.option("--reviewer", required=True)
@click.option("--verdict", type=click.Choice(list(queue.VERDICTS)), required=True)
@click.option("--note", default=None)
def resolve_cmd(flag_id: int, reviewer: str, verdict: str, note: str | None) -> None:
    """Record a verdict on a flag you hold."""
    try:
        with transaction(_url()) as session:
            flag = queue.resolve_flag(session, flag_id, reviewer, verdict, note, settings=get_settings())
    except queue.FlagQueueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_line(flag))


@flags.command("release")
@click.argument("flag_id", type=int)
@click.option("--reviewer", required=True)
def release_cmd(flag_id: int, reviewer: str) -> None:
    """Give a claimed flag back to the queue without a verdict."""
    try:
        with transaction(_url()) as session:
            flag = queue.release_flag(session, flag_id, reviewer)
    except queue.FlagQueueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_line(flag))


if __name__ == "__main__":
    flags()
