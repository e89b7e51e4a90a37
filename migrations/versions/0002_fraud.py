"""Fraud checks: the perceptual-hash band index for duplicate-photo search.

Revision ID: 0002_fraud
Revises: 0001_initial
Create Date: 2026-11-29

Compatibility rule: workers of the previous release keep running while this migrates.
Add columns as nullable (or with a server default), never rename or drop in the same
release that stops using a column. (This revision only adds a table.)
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_fraud"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_hash_bands",
        sa.Column("image_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("view", sa.String(length=16), nullable=False),
        sa.Column("hash_kind", sa.String(length=8), nullable=False),
        sa.Column("band_no", sa.SmallInteger(), nullable=False),
        sa.Column("band_value", sa.Integer(), nullable=False),
        sa.Column("hash_value", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_image_hash_bands_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("image_id", "view", "hash_kind", "band_no", name=op.f("pk_image_hash_bands")),
    )
    op.create_index(
        "ix_image_hash_bands_lookup", "image_hash_bands",
        ["hash_kind", "band_no", "band_value", "image_id"], unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_image_hash_bands_lookup", table_name="image_hash_bands")
    op.drop_table("image_hash_bands")
