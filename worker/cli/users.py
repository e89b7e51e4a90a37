"""`catalog users ...`: accounts of the review service.

    catalog users add NAME --role reviewer|admin [--password-stdin]
    catalog users token NAME [--label TEXT]     prints a new bearer token, once
    catalog users list
    catalog users deactivate NAME
"""

from __future__ import annotations

import sys

import click
from sqlalchemy import select

from db import models as m
from db.session import transaction
from worker.api import auth
from worker.cli.common import cli_settings, ensure_schema


def _url() -> str:
    settings = cli_settings()
    ensure_schema(settings)
    return settings.effective_database_url


@click.group("users")
def users() -> None:
    """Accounts of the review service (catalog api): reviewers, admins, API tokens."""


@users.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(list(auth.ROLES)), required=True)
@click.option("--password-stdin", is_flag=True,
              help="Read the login password from standard input (one line). Without it the "
              "user is an API client with tokens only.")
def add_cmd(name: str, role: str, password_stdin: bool) -> None:
    """Create a user. Reviewers work the queue; admins also manage users and models."""
    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        with transaction(_url()) as session:
            auth.create_user(session, name, role, password)
    except auth.AuthError as exc:
        raise click.ClickException(str(exc)) from None
    how = "can log in at /review" if password else "has no password: give it a token (catalog users token)"
    click.echo(f"user {name} ({role}) created; {how}")


@users.command("token")
@click.argument("name")
@click.option("--label", default=None, help="What the token is for (shown in listings).")
def token_cmd(name: str, label: str | None) -> None:
    """Issue a bearer token for NAME and print it. It is stored only as a hash: copy it now."""
    try:
        with transaction(_url()) as session:
            token = auth.issue_token(session, name, label)
    except auth.AuthError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(token)


@users.command("list")
def list_cmd() -> None:
    """Users, their role, whether they can log in and how many live tokens they have."""
    with transaction(_url()) as session:
        for user in session.execute(select(m.ApiUser).order_by(m.ApiUser.name)).scalars():
            tokens = session.execute(select(m.ApiToken.id).where(
                m.ApiToken.user_id == user.id, m.ApiToken.revoked_at.is_(None))).all()
            click.echo(f"{user.name:24} {user.role:9} {'active' if user.active else 'deactivated':12} "
                       f"{'password' if user.password_hash else 'token-only':11} {len(tokens)} token(s)")


@users.command("deactivate")
@click.argument("name")
def deactivate_cmd(name: str) -> None:
    """Lock NAME out: no login, every token revoked."""
    try:
        with transaction(_url()) as session:
            auth.deactivate_user(session, name)
    except auth.AuthError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"user {name} deactivated")
