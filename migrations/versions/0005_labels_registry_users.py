"""Reviewed labels, model-registry details, API users and tokens.

Revision ID: 0005_labels_registry_users
Revises: 0004_image_leases
Create Date: 2026-11-30

* ``labels``: reviewed and imported labels (tags, categories, boxes, attributes, flag verdicts)
  with who, when, source, what changed, the model version corrected and a fixed train/held-out
  split: what retraining learns from (issue 9).
* ``model_versions``: artifact checksum, the training run that made it, retirement time;
  ``training_runs``: the promotion decision, its reason and the label counts.
* ``api_users`` / ``api_tokens``: accounts of the review service (issue 10); tokens are stored
  as their SHA-256 only.

Compatibility rule: workers of the previous release keep running while this migrates.
Add columns as nullable (or with a server default), never rename or drop in the same
release that stops using a column. (New tables only, and nullable columns.)
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_labels_registry_users"
down_revision = "0004_image_leases"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("image_id", BigId, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=True),
        sa.Column("listing_id", BigId, sa.ForeignKey("listings.id", ondelete="CASCADE"), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("value", sa.String(255), nullable=True),
        sa.Column("x0", sa.Float(), nullable=True),
        sa.Column("y0", sa.Float(), nullable=True),
        sa.Column("x1", sa.Float(), nullable=True),
        sa.Column("y1", sa.Float(), nullable=True),
        sa.Column("detection_id", BigId, sa.ForeignKey("detections.id", ondelete="SET NULL"), nullable=True),
        sa.Column("flag_id", BigId, sa.ForeignKey("flags.id", ondelete="SET NULL"), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("reviewer", sa.String(255), nullable=False),
        sa.Column("corrects_model_version", sa.String(128), nullable=True),
        sa.Column("previous", sa.JSON(), nullable=True),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", When, nullable=False),
    )
    op.create_index("ix_labels_image_id", "labels", ["image_id"])
    op.create_index("ix_labels_listing_id", "labels", ["listing_id"])
    op.create_index("ix_labels_target", "labels", ["kind", "image_id", "listing_id", "name", "active"])

    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("checksum", sa.String(64), nullable=True))
        batch.add_column(sa.Column("training_run_id", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("retired_at", When, nullable=True))
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("decision", sa.String(16), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("label_counts", sa.JSON(), nullable=True))

    op.create_table(
        "api_users",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", When, nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("user_id", BigId, sa.ForeignKey("api_users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("last_used_at", When, nullable=True),
        sa.Column("revoked_at", When, nullable=True),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_api_tokens_user_id", table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("api_users")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_column("label_counts")
        batch.drop_column("reason")
        batch.drop_column("decision")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("retired_at")
        batch.drop_column("training_run_id")
        batch.drop_column("checksum")
    op.drop_index("ix_labels_target", table_name="labels")
    op.drop_index("ix_labels_listing_id", table_name="labels")
    op.drop_index("ix_labels_image_id", table_name="labels")
    op.drop_table("labels")
