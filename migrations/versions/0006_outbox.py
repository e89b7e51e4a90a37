"""Transactional outbox for outbound events (``listing.processed``).

Revision ID: 0006_outbox
Revises: 0005_labels_registry_users
Create Date: 2026-11-30

* ``outbox_events``: one row per outbound event, written in the same transaction as the
  listing state it reports (a crash never loses or invents one). A relay publishes rows to
  the results stream (``published_at``, ``stream_id``) and, when a webhook is configured,
  POSTs them (``webhook_status`` pending -> delivered | dead). ``dedupe_key`` is unique: one
  completion of a listing can never be reported twice (issue 13, item 8).

Compatibility rule: workers of the previous release keep running while this migrates.
Add columns as nullable (or with a server default), never rename or drop in the same
release that stops using a column. (A new table only; old workers never write to it.)
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_outbox"
down_revision = "0005_labels_registry_users"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "outbox_events",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("dedupe_key", sa.String(255), nullable=True, unique=True),
        sa.Column("listing_id", sa.BigInteger(), nullable=True),
        sa.Column("listing_external_id", sa.String(255), nullable=True),
        sa.Column("reason", sa.String(16), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.Column("published_at", When, nullable=True),
        sa.Column("stream_id", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("webhook_status", sa.String(16), nullable=True),
        sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("webhook_at", When, nullable=True),
        sa.Column("webhook_error", sa.Text(), nullable=True),
    )
    op.create_index("ix_outbox_events_listing_id", "outbox_events", ["listing_id"])
    op.create_index("ix_outbox_events_published_at", "outbox_events", ["published_at"])
    op.create_index("ix_outbox_events_webhook_status", "outbox_events", ["webhook_status"])


def downgrade() -> None:
    op.drop_index("ix_outbox_events_webhook_status", table_name="outbox_events")
    op.drop_index("ix_outbox_events_published_at", table_name="outbox_events")
    op.drop_index("ix_outbox_events_listing_id", table_name="outbox_events")
    op.drop_table("outbox_events")
