"""`catalog flags ...`: the reviewers' queue on the command line.

    catalog flags list [--status open|claimed|confirmed|dismissed|claimable] [--kind KIND] [--json]
    catalog flags claim [FLAG_ID] --reviewer NAME [--ttl SECONDS] [--kind KIND] [--json]
    catalog flags resolve FLAG_ID --reviewer NAME --verdict confirmed|dismissed [--note TEXT]
    catalog flags release FLAG_ID --reviewer NAME

The group is attached to the main CLI by ``worker.cli``; it can also run alone
(``python -m worker.cli_flags``).
"""

from __future__ import annotations

import json
from datetime import datetime

import click
from sqlalchemy import select

from db.session import transaction
from worker.config import get_settings
from worker.fraud.champion import fraud_weights
from worker.review import queue


def _url() -> str:
    return get_settings().effective_database_url


def _when(value: datetime | None) -> str:
    """A time with its date and zone, in the machine's local zone (what a person compares
    with their clock), e.g. 2026-11-30 14:05:09 CET."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if value else "?"


def _line(flag: queue.FlagView) -> str:
    summary = flag.evidence.get("summary") or ""
    holder = ""
    if flag.status == "claimed":
        holder = f" by {flag.claimed_by}" + (f" (expired {_when(flag.claim_expires_at)})" if flag.claim_expired
                                             else f" until {_when(flag.claim_expires_at)}")
    elif flag.reviewed_by:
        holder = f" by {flag.reviewed_by} at {_when(flag.reviewed_at)}"
    listing = flag.listing_external_id or f"#{flag.listing_id}"
    image = f" image {flag.image_id}" if flag.image_id is not None else ""
    return (f"#{flag.id:<6} {flag.kind:<18} {flag.score:5.2f}  {flag.status}{holder}  "
            f"listing {listing}{image}  {summary}").rstrip()


def _image_ref(flag: queue.FlagView) -> str | None:
    """Where the flagged photo is (what the worker read), for a reviewer on the command line."""
    if flag.image_id is None:
        return None
    with transaction(_url()) as session:
        return session.execute(select(queue.m.Image.url).where(queue.m.Image.id == flag.image_id)).scalar()


def _kind_ok(kind: str | None) -> None:
    if kind is None:
        return
    with transaction(_url()) as session:
        try:
            queue.check_kind(session, kind)
        except queue.FlagQueueError as exc:
            raise click.ClickException(str(exc)) from None


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
    """List flags, oldest first. Listings are named by the shop's id (as `catalog show` takes)."""
    _kind_ok(kind)
    with transaction(_url()) as session:
        items = queue.list_flags(session, status=status, kind=kind, limit=limit)
        ids = [f.image_id for f in items if f.image_id is not None]
        photos: dict[int | None, str] = dict(session.execute(
            select(queue.m.Image.id, queue.m.Image.url).where(queue.m.Image.id.in_(ids))).all()) if ids else {}
    if as_json:
        click.echo(json.dumps([{**f.to_dict(), "photo": photos.get(f.image_id)} for f in items],
                              indent=2, default=str))
        return
    if not items:
        click.echo("no flags")
    for flag in items:
        click.echo(_line(flag))
        if flag.image_id in photos:
            click.echo(f"        photo {photos[flag.image_id]}")


@flags.command("claim")
@click.argument("flag_id", type=int, required=False)
@click.option("--reviewer", required=True)
@click.option("--ttl", type=int, default=None, help="Seconds to hold the claim [default: CATALOG_FLAG_CLAIM_TTL]")
@click.option("--kind", default=None, help="Only claim flags of this kind.")
@click.option("--json", "as_json", is_flag=True)
def claim_cmd(flag_id: int | None, reviewer: str, ttl: int | None, kind: str | None, as_json: bool) -> None:
    """Claim FLAG_ID, or without it the most serious open (or expired) flag: fraud weight of
    its kind x score, then oldest."""
    ttl = ttl if ttl is not None else get_settings().flag_claim_ttl
    if flag_id is not None and kind is not None:
        raise click.UsageError("give a FLAG_ID or --kind, not both")
    _kind_ok(kind)
    try:
        with transaction(_url()) as session:
            if flag_id is not None:
                flag: queue.FlagView | None = queue.claim_flag(session, flag_id, reviewer, ttl)
            else:
                flag = queue.claim_next_flag(session, reviewer, ttl, kind=kind,
                                             weights=fraud_weights(get_settings()).weights)
    except queue.FlagQueueError as exc:
        raise click.ClickException(str(exc)) from None
    if flag is None:
        click.echo("null" if as_json else "the queue is empty")
        return
    if as_json:
        click.echo(json.dumps(flag.to_dict(), indent=2, default=str))
        return
    click.echo(_line(flag))
    ref = _image_ref(flag)
    if ref:
        click.echo(f"photo: {ref}")
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
