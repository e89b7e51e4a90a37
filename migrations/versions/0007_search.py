"""Visual search: the vectors the search index holds (issue 11).

Revision ID: 0007_search
Revises: 0006_outbox
Create Date: 2026-11-30

* ``search_vectors``: one L2-normalised float32 vector per image and kind (``full``: the whole
  photo, ``region``: the product crop), with the listing id for deletion and filters. Filled
  from the tagging embedding and the ``embedding`` step when an image's results are stored;
  existing images get theirs from ``catalog search-index rebuild`` (full vectors are copied
  from ``embeddings``) or when they are analysed again.
* On Postgres where the ``vector`` extension is available (pgvector >= 0.7): the extension is
  created, ``search_vectors.embedding halfvec(1280)`` is added and filled from existing rows,
  and one HNSW cosine index per kind is built (partial indexes, so a query for one kind never
  walks the other's graph). On Postgres without pgvector and on SQLite nothing of this is done:
  the embedded index (worker/search/embedded.py) serves those, and ``catalog search-index
  rebuild`` adds the column later if an operator installs the extension.

Compatibility rule: workers of the previous release keep running while this migrates.
Add columns as nullable (or with a server default), never rename or drop in the same
release that stops using a column. (A new table only; old workers never write to it.)
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_search"
down_revision = "0006_outbox"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)

#: Same statements as worker.search.pgvector.SCHEMA (migrations may import only ``db``).
PGVECTOR_DIM = 1280
PGVECTOR_SCHEMA = (
    "CREATE EXTENSION IF NOT EXISTS vector",
    f"ALTER TABLE search_vectors ADD COLUMN IF NOT EXISTS embedding halfvec({PGVECTOR_DIM})",
    "CREATE INDEX IF NOT EXISTS ix_search_vectors_hnsw_full ON search_vectors "
    "USING hnsw (embedding halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE kind = 'full'",
    "CREATE INDEX IF NOT EXISTS ix_search_vectors_hnsw_region ON search_vectors "
    "USING hnsw (embedding halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE kind = 'region'",
)


def _pgvector_available() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    row = bind.execute(sa.text(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")).first()
    if row is None or row[0] is None:
        return False
    major, minor = (int(part) for part in str(row[0]).split(".")[:2])
    return (major, minor) >= (0, 7)  # halfvec arrived in 0.7.0


def upgrade() -> None:
    op.create_table(
        "search_vectors",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("image_id", BigId, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("listing_id", BigId, sa.ForeignKey("listings.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.CheckConstraint("kind IN ('full', 'region')", name="ck_search_vectors_kind"),
        sa.UniqueConstraint("image_id", "kind", name="uq_search_vectors_image_id_kind"),
        sqlite_autoincrement=True,  # ids are never reused: the embedded index keys vectors by id
    )
    op.create_index("ix_search_vectors_listing_id", "search_vectors", ["listing_id"])
    op.create_index("ix_search_vectors_kind_id", "search_vectors", ["kind", "id"])
    # Existing analysed images: their tagging embedding is the full-photo vector.
    op.execute(sa.text(
        "INSERT INTO search_vectors (image_id, listing_id, kind, model_version, dim, vector, created_at) "
        "SELECT e.image_id, i.listing_id, 'full', e.model_version, e.dim, e.vector, CURRENT_TIMESTAMP "
        "FROM embeddings e JOIN images i ON i.id = e.image_id "
        "JOIN listings l ON l.id = i.listing_id "
        "WHERE i.status = 'done' AND l.status <> 'deleted' "
        "AND e.id = (SELECT MAX(e2.id) FROM embeddings e2 WHERE e2.image_id = e.image_id)"))
    if _pgvector_available():
        for statement in PGVECTOR_SCHEMA[:2]:
            op.execute(sa.text(statement))
        _fill_pgvector()
        for statement in PGVECTOR_SCHEMA[2:]:
            op.execute(sa.text(statement))


def _fill_pgvector() -> None:
    """Copy the float32 bytes of existing rows into the halfvec column, in batches."""
    import numpy as np

    bind = op.get_bind()
    last = 0
    while True:
        rows = bind.execute(sa.text(
            "SELECT id, vector FROM search_vectors WHERE id > :last AND dim = :dim ORDER BY id LIMIT 1000"),
            {"last": last, "dim": PGVECTOR_DIM}).all()
        if not rows:
            return
        for row_id, blob in rows:
            text = "[" + ",".join(f"{v:.6g}" for v in np.frombuffer(bytes(blob), dtype="<f4")) + "]"
            bind.execute(sa.text("UPDATE search_vectors SET embedding = CAST(:v AS halfvec) WHERE id = :id"),
                         {"v": text, "id": row_id})
        last = rows[-1][0]


def downgrade() -> None:
    op.drop_index("ix_search_vectors_kind_id", table_name="search_vectors")
    op.drop_index("ix_search_vectors_listing_id", table_name="search_vectors")
    op.drop_table("search_vectors")  # the pgvector indexes go with it; the extension stays
