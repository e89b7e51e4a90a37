"""Duplicate photos, the pure part: hashes, bands, the step and the decision on candidates.

The database side (band index, locks, candidate search) is tested in
tests/worker/pipeline/test_duplicates.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import skimage.data
from PIL import Image, ImageOps

from tests.support.fraud import stolen_copy
from worker.config import load_settings
from worker.fraud.duplicates import (
    Candidate,
    DuplicateQuery,
    DuplicatesStep,
    assess,
    band_values,
    best_match,
    cosine_to,
    lock_keys,
)
from worker.fraud.fingerprint import fingerprint, stored_part, trim_borders
from worker.pipeline.contract import ImageContext, StepResult


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _ctx(img: Image.Image, sha256: str = "ab" * 32) -> ImageContext:
    return ImageContext(image_id=1, listing_id=1, seller_id="s", category=None, url="u", image=img,
                        raw=b"", source_format="PNG", sha256=sha256, settings=load_settings())


def _stored(img: Image.Image) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for h in fingerprint(img):
        out.setdefault(h.view, {})[h.kind] = h.value
    return out


def _candidate(image_id: int, seller: str, *, listing_id: int | None = None, hashes=None,
               identical: bool = False, cosine: float | None = None) -> Candidate:
    return Candidate(image_id=image_id, listing_id=listing_id if listing_id is not None else 100 + image_id,
                     listing_external_id=f"ext-{image_id}", seller_id=seller, url=f"https://x/{image_id}.jpg",
                     first_seen=datetime(2026, 1, 2, tzinfo=UTC), hashes=hashes or {},
                     identical=identical, cosine=cosine)


def test_bands_split_the_hash_and_pigeonhole_holds() -> None:
    value = 0x0123_4567_89AB_CDEF
    assert band_values(value) == [0x0123, 0x4567, 0x89AB, 0xCDEF]
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = int(rng.integers(0, 2**63)) * 2 + 1
        flips = rng.choice(64, size=3, replace=False)
        b = a
        for bit in flips:
            b ^= 1 << int(bit)
        assert any(x == y for x, y in zip(band_values(a), band_values(b), strict=True))


def test_trim_borders_removes_padding_only() -> None:
    img = _photo("coffee")
    framed = ImageOps.expand(img, border=(30, 12), fill=(250, 250, 250))
    assert trim_borders(framed).size == img.size
    assert trim_borders(img).size == img.size


def test_mirror_and_crop_views_match() -> None:
    img = _photo("chelsea")
    stored = _stored(img)
    copy = stolen_copy(img)
    query = fingerprint(copy, mirrored=True)
    match = best_match(query, stored)
    assert match is not None and match.mirrored and match.distance <= 14
    other = best_match(fingerprint(_photo("astronaut"), mirrored=True), stored)
    assert other is not None and other.distance > 30


def test_the_step_is_pure_it_hashes_and_hands_the_query_over() -> None:
    img = _photo("rocket")
    ctx = _ctx(img)
    ctx.results["tagging"] = StepResult(embedding=np.full(8, 3.0, dtype=np.float32))
    result = DuplicatesStep().run(ctx)
    assert result.flags == [] and result.data["searched"] is False
    assert {h["view"] for h in result.data["hashes"]} >= {"full", "c85", "c70", "cut_left"}
    handoff = result.handoff
    assert isinstance(handoff, DuplicateQuery)
    assert handoff.sha256 == "ab" * 32
    assert handoff.stored == stored_part(handoff.query)
    assert any(h.mirrored for h in handoff.query) and not any(h.mirrored for h in handoff.stored)
    assert [f"{h.value:016x}" for h in handoff.stored] == [h["value"] for h in result.data["hashes"]]
    assert handoff.embedding is not None and np.isclose(np.linalg.norm(handoff.embedding), 1.0)


def test_lock_keys_are_sorted_and_cover_the_whole_image_views_only() -> None:
    query = fingerprint(_photo("coffee"), query=True)
    keys = lock_keys(query)
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    full = [h for h in query if h.view == "full"]
    assert 0 < len(keys) <= len(full) * 4  # pHash + dHash, mirrored or not, four bands each
    assert lock_keys([h for h in query if h.view != "full"]) == []


def test_assess_flags_other_sellers_only() -> None:
    settings = load_settings()
    original = _photo("coffee")
    query = DuplicatesStep().run(_ctx(stolen_copy(original))).handoff
    same_hashes = _stored(original)
    candidates = [
        _candidate(1, "seller-a", hashes=same_hashes),  # the original, another seller
        _candidate(2, "seller-b", hashes=same_hashes),  # the uploader's own photo elsewhere
        _candidate(3, "seller-c", hashes=_stored(_photo("rocket"))),  # unrelated
        _candidate(4, "seller-d", hashes=same_hashes, listing_id=7),  # same listing: ignored
    ]
    flags, data = assess(query, candidates, listing_id=7, seller_id="seller-b", settings=settings)
    assert data == {"searched": True, "candidates": 4, "matches_other_sellers": 1,
                    "matches_same_seller": 1, "embedding_used": False}
    assert [f.kind for f in flags] == ["duplicate_image"]
    ev = flags[0].evidence
    assert ev["matched_image_id"] == 1 and ev["matched_seller_id"] == "seller-a"
    assert ev["mirrored"] is True and ev["hash_kind"] == "phash+dhash" and ev["hamming_distance"] <= 14
    assert ev["matched_listing_external_id"] == "ext-1" and ev["matched_first_seen"].startswith("2026-01-02")
    assert "another seller (seller-a)" in ev["summary"]
    assert 0.5 <= flags[0].score <= 1.0

    none, data = assess(query, candidates[1:3], listing_id=7, seller_id="seller-b", settings=settings)
    assert none == [] and data["matches_other_sellers"] == 0


def test_identical_bytes_match_and_embedding_can_veto_or_confirm() -> None:
    settings = load_settings()
    original = _photo("chelsea")
    query = DuplicatesStep().run(_ctx(original)).handoff
    (flag,), _ = assess(query, [_candidate(1, "a", identical=True)], listing_id=9, seller_id="b",
                        settings=settings)
    assert flag.evidence["hash_kind"] == "sha256" and flag.score == 1.0

    copy_query = DuplicatesStep().run(_ctx(stolen_copy(original))).handoff
    stored = _stored(original)
    veto = settings.duplicate_veto_cosine - 0.05
    flags, _ = assess(copy_query, [_candidate(1, "a", hashes=stored, cosine=veto)], listing_id=9,
                      seller_id="b", settings=settings)
    assert flags == []  # the embeddings disagree: a hash collision, not a copy
    flags, _ = assess(copy_query, [_candidate(1, "a", hashes=stored, cosine=None)], listing_id=9,
                      seller_id="b", settings=settings)
    assert flags  # no stored vector: the hashes decide
    (flag,), _ = assess(copy_query, [_candidate(1, "a", hashes=stored, cosine=0.99)], listing_id=9,
                        seller_id="b", settings=settings)
    assert flag.score >= 0.99 and "cosine 0.99" in flag.evidence["summary"]


def test_cosine_to_a_stored_vector() -> None:
    query = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    assert cosine_to(query, np.array([2.0, 0.0, 0.0], dtype="<f4").tobytes()) == 1.0
    assert cosine_to(query, np.array([0.0, 1.0, 0.0], dtype="<f4").tobytes()) == 0.0
    assert cosine_to(query, np.zeros(3, dtype="<f4").tobytes()) is None
    assert cosine_to(query, np.ones(4, dtype="<f4").tobytes()) is None  # other model's size
