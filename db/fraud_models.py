"""Tables owned by the fraud checks (issue 5). Created by migration 0002_fraud.

``image_hash_bands`` is a multi-index-hashing table: every 64-bit perceptual hash of every
view of an image is split into four 16-bit bands, one row per band. Two hashes within
Hamming distance 3 share at least one band exactly (pigeonhole), and within distance 7 they
share a band up to one flipped bit, so a B-tree lookup on (kind, band, value) finds
near-duplicate candidates in Postgres or SQLite without extensions. Each row also carries the
full hash so candidates are verified with an exact Hamming distance without another table.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, SmallInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models import Base


class ImageHashBand(Base):
    __tablename__ = "image_hash_bands"
    __table_args__ = (
        # The lookup index; image_id at the end lets Postgres answer from the index alone.
        Index("ix_image_hash_bands_lookup", "hash_kind", "band_no", "band_value", "image_id"),
    )

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    view: Mapped[str] = mapped_column(String(16), primary_key=True)  # full, trim, c85, cut_left...
    hash_kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # phash | dhash
    band_no: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # 0..3
    band_value: Mapped[int] = mapped_column(Integer)  # 0..65535
    hash_value: Mapped[int] = mapped_column(BigInteger)  # the whole hash, signed 64-bit
