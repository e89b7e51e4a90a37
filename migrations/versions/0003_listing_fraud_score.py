"""Listing-level fraud score and decision.

Revision ID: 0003_listing_fraud_score
Revises: 0002_fraud
Create Date: 2026-11-29

Compatibility rule: workers of the previous release keep running while this migrates.
Add columns as nullable (or with a server default), never rename or drop in the same
release that stops using a column. (Both columns are nullable.)
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_listing_fraud_score"
down_revision = "0002_fraud"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("listings") as batch:
        batch.add_column(sa.Column("fraud_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("fraud_decision", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("listings") as batch:
        batch.drop_column("fraud_decision")
        batch.drop_column("fraud_score")
