"""Image leases and completeness; images of deleted listings get a final state.

Revision ID: 0004_image_leases
Revises: 0003_listing_fraud_score
Create Date: 2026-11-30

* ``images.lease_owner`` / ``images.lease_expires_at``: the run analysing an image holds a
  lease it renews; one that ran out is re-queued within minutes (worker/pipeline/lease.py).
* ``images.complete``: whether every configured step ran ok on the image.
* Pending images of deleted listings (left pending forever by earlier releases) become
  ``failed`` with ``listing_deleted: ...``, the state new deletes give them.

Compatibility rule: workers of the previous release keep running while this migrates.
Add columns as nullable (or with a server default), never rename or drop in the same
release that stops using a column. (All three columns are nullable; an old worker leaves
them NULL, which reads as "not leased" and "completeness unknown".)
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_image_leases"
down_revision = "0003_listing_fraud_score"
branch_labels = None
depends_on = None

LISTING_DELETED = "listing_deleted: the listing was deleted before this image was analysed"


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("complete", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("lease_owner", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_images_status_lease_expires_at", "images", ["status", "lease_expires_at"])
    images = sa.table("images", sa.column("status", sa.String), sa.column("error", sa.Text),
                      sa.column("complete", sa.Boolean), sa.column("listing_id", sa.BigInteger))
    listings = sa.table("listings", sa.column("id", sa.BigInteger), sa.column("status", sa.String))
    op.execute(
        images.update()
        .where(images.c.status == "pending",
               images.c.listing_id.in_(sa.select(listings.c.id).where(listings.c.status == "deleted")))
        .values(status="failed", error=LISTING_DELETED, complete=False)
    )


def downgrade() -> None:
    op.drop_index("ix_images_status_lease_expires_at", table_name="images")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
        batch.drop_column("complete")
