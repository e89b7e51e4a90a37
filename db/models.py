"""Tables that downstream systems read directly: keep names and columns stable.

Ids are integers (BIGINT on Postgres) so that analysts can join on them in plain SQL.
Status columns are plain strings checked by constraints, which keeps migrations simple on
both SQLite and Postgres.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Integer on SQLite so that the column is an alias of ROWID (autoincrement works there).
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

LISTING_STATUSES = ("pending", "processing", "done", "deleted")
IMAGE_STATUSES = ("pending", "done", "failed")
#: ``listings.fraud_decision``: ``incomplete`` when the flags found call for nothing but some
#: image was not fully analysed (failed, or a step failed or was unavailable): never ``ok`` then.
FRAUD_DECISIONS = ("ok", "review", "hold", "incomplete")
FLAG_STATUSES = ("open", "claimed", "confirmed", "dismissed")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Listing(Base):
    __tablename__ = "listings"
    __table_args__ = (CheckConstraint(_in("status", LISTING_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True)
    seller_id: Mapped[str] = mapped_column(String(255), index=True)
    title: Mapped[str] = mapped_column(Text, default="")
    category: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    last_event_id: Mapped[str | None] = mapped_column(String(255))
    last_event_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    processed_at: Mapped[datetime | None]
    # Combined fraud signals of all images (worker/fraud/score.py), set when the listing is done
    # and again when a reviewer resolves one of its flags.
    fraud_score: Mapped[float | None] = mapped_column(Float)
    fraud_decision: Mapped[str | None] = mapped_column(String(16))  # ok | review | hold | incomplete

    images: Mapped[list[Image]] = relationship(
        back_populates="listing", order_by="Image.position", cascade="all, delete-orphan"
    )


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),
        Index("ix_images_status_updated_at", "status", "updated_at"),
        Index("ix_images_status_lease_expires_at", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    url: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # 64-bit perceptual hashes stored as signed BIGINT (two's complement of the unsigned value).
    phash: Mapped[int | None] = mapped_column(BigInteger)
    dhash: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    # Analysis runs started for the current version of the image (reset when an event changes it).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    processed_at: Mapped[datetime | None]
    # True when every configured step ran ok; False when the image failed or a step failed, was
    # unavailable or was skipped (status is still "done" then); NULL while pending.
    complete: Mapped[bool | None] = mapped_column(Boolean)
    # The run analysing the image right now (worker/pipeline/lease.py): its token and until when
    # the lease holds unless renewed. An expired lease means the run died; NULL when nobody runs it.
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]

    listing: Mapped[Listing] = relationship(back_populates="images")


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    score: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Detection(Base):
    __tablename__ = "detections"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(255))
    score: Mapped[float] = mapped_column(Float)
    x0: Mapped[float] = mapped_column(Float)
    y0: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(128))


class Flag(Base):
    __tablename__ = "flags"
    __table_args__ = (
        CheckConstraint(_in("status", FLAG_STATUSES), name="status"),
        Index("ix_flags_status_created_at", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="open")
    model_version: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[datetime | None]
    claim_expires_at: Mapped[datetime | None]
    reviewed_by: Mapped[str | None] = mapped_column(String(255))
    reviewed_at: Mapped[datetime | None]
    note: Mapped[str | None] = mapped_column(Text)


class Review(Base):
    """A reviewer's decision: a flag verdict or a tag correction (training labels)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    flag_id: Mapped[int | None] = mapped_column(ForeignKey("flags.id", ondelete="SET NULL"), index=True)
    listing_id: Mapped[int | None] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    reviewer: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))  # flag_verdict | tag_correction
    verdict: Mapped[str | None] = mapped_column(String(32))  # confirmed | dismissed
    label: Mapped[str | None] = mapped_column(String(255))  # corrected tag / category
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    path: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="candidate")  # candidate|champion|retired
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]
    checksum: Mapped[str | None] = mapped_column(String(64))  # sha256 of the artifact file
    training_run_id: Mapped[int | None] = mapped_column(BigInteger)  # the run that made it
    retired_at: Mapped[datetime | None]


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|succeeded|failed
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    decision: Mapped[str | None] = mapped_column(String(16))  # promoted | rejected | skipped | failed
    reason: Mapped[str | None] = mapped_column(Text)  # why the candidate was or was not promoted
    label_counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ProcessedEvent(Base):
    """One row per event id: the primary key is what makes redelivery harmless."""

    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    listing_external_id: Mapped[str] = mapped_column(String(255), index=True)
    occurred_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    outcome: Mapped[str] = mapped_column(String(32), default="applied")  # applied | stale


class DeadLetter(Base):
    """Events that could not be understood, kept with the reason (never block the stream)."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source: Mapped[str] = mapped_column(String(255))  # stream entry id, file name, ...
    payload: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StepRunRecord(Base):
    """What each analysis step ran on each image, which model version, how long it took."""

    __tablename__ = "step_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # ok | unavailable | failed | skipped
    duration_ms: Mapped[float] = mapped_column(Float)
    output: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Embedding(Base):
    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("image_id", "model_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(128))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # little-endian float32, L2-normalised


#: ``search_vectors.kind``: the whole photo, or the product region (segmentation box, else the
#: main detection) cropped out of it (issue 11, worker/search/).
SEARCH_VECTOR_KINDS = ("full", "region")


class SearchVector(Base):
    """What the visual search index holds: one L2-normalised vector per image and kind.

    Written with the image's results (replaced when it is analysed again, gone when it fails or
    its listing is deleted). On Postgres with pgvector, migration 0007 (or ``catalog
    search-index rebuild``) adds a ``halfvec`` column ``embedding`` with HNSW cosine indexes;
    it is not declared here because plain Postgres and SQLite do not have it (worker/search/).
    The ``embeddings`` table keeps the tagging embedding as before.
    """

    __tablename__ = "search_vectors"
    __table_args__ = (
        UniqueConstraint("image_id", "kind", name="uq_search_vectors_image_id_kind"),
        CheckConstraint(_in("kind", SEARCH_VECTOR_KINDS), name="kind"),
        Index("ix_search_vectors_kind_id", "kind", "id"),
        # ids are never reused on SQLite either: the embedded index keys its vectors by id
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    listing_id: Mapped[int] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(128))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # little-endian float32, L2-normalised
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArtifactRecord(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # cutout | superres
    path: Mapped[str] = mapped_column(Text)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Label(Base):
    """A reviewed or imported label: the ground truth retraining learns from.

    One row per decision, never updated in place except ``active``: a newer label for the same
    (image or listing, kind, name) supersedes the older one, which stays as history. ``split``
    is assigned once, deterministically from the image (or listing) id, so the held-out set
    that candidate and champion are compared on never changes under them. Sellers' declared
    categories are weak labels and are not stored here (they stay in ``listings.category``).
    """

    __tablename__ = "labels"
    __table_args__ = (Index("ix_labels_target", "kind", "image_id", "listing_id", "name", "active"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    listing_id: Mapped[int | None] = mapped_column(ForeignKey("listings.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # tag | category | box | attribute | flag_verdict
    action: Mapped[str] = mapped_column(String(16))  # confirm | reject | set | add | correct | delete
    name: Mapped[str | None] = mapped_column(String(255))  # tag, category, box label or attribute name
    value: Mapped[str | None] = mapped_column(String(255))  # attribute value or flag verdict
    x0: Mapped[float | None] = mapped_column(Float)
    y0: Mapped[float | None] = mapped_column(Float)
    x1: Mapped[float | None] = mapped_column(Float)
    y1: Mapped[float | None] = mapped_column(Float)
    detection_id: Mapped[int | None] = mapped_column(ForeignKey("detections.id", ondelete="SET NULL"))
    flag_id: Mapped[int | None] = mapped_column(ForeignKey("flags.id", ondelete="SET NULL"))
    source: Mapped[str] = mapped_column(String(16))  # review | import
    reviewer: Mapped[str] = mapped_column(String(255))
    corrects_model_version: Mapped[str | None] = mapped_column(String(128))
    previous: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    split: Mapped[str] = mapped_column(String(8))  # train | heldout
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiUser(Base):
    """A person or client of the HTTP API (``catalog users add``)."""

    __tablename__ = "api_users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # reviewer | admin
    password_hash: Mapped[str | None] = mapped_column(Text)  # None: token-only client
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token, stored as its SHA-256 only (the token itself is shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("api_users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class OutboxEvent(Base):
    """An outbound event (``listing.processed``), written in the same transaction as the state
    it reports; worker/outbound/ publishes it to the results stream and the webhook after commit.

    ``dedupe_key`` is unique, so one completion of a listing is recorded once however often
    its last image is redelivered. ``published_at`` NULL: not on the stream yet (the relay's
    sweep retries it). ``webhook_status``: NULL when no webhook was configured at write time,
    else ``pending`` -> ``delivered`` | ``dead`` (a dead letter row holds the reason)."""

    __tablename__ = "outbox_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    dedupe_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    listing_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    listing_external_id: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(String(16))  # processed | rescored
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(index=True)
    stream_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    webhook_status: Mapped[str | None] = mapped_column(String(16), index=True)  # pending | delivered | dead
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_at: Mapped[datetime | None]
    webhook_error: Mapped[str | None] = mapped_column(Text)
