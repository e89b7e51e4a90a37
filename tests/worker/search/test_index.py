"""The visual-search index on both backends (pgvector; embedded on SQLite and on Postgres
without pgvector): insert, query, filters, deletion, re-index after update, same-seller
exclusion, near-duplicate collapsing, and the errors a query can end in."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from db import models as m
from tests.worker.search.conftest import VERSION, SearchEnv, ids
from worker.pipeline.store import clear_results
from worker.search.errors import SearchError
from worker.search.index import IndexFilters
from worker.search.similar import SimilarQuery, similar, vector_for_image, vector_for_listing
from worker.search.vectors import remove_listing_vectors


def query(env: SearchEnv, vec: np.ndarray, **options: object) -> list[int]:
    return ids(similar(env.session, env.settings, SimilarQuery(vector=vec, **options)))  # type: ignore[arg-type]


def test_nearest_listings_come_first_with_their_image_and_score(search: SearchEnv) -> None:
    base = search.vector()
    near, _ = search.add(search.vector(base, 0.6))
    nearer, nearer_img = search.add(search.vector(base, 0.3))
    far, _ = search.add(search.vector())
    results = similar(search.session, search.settings, SimilarQuery(vector=base, k=3))
    assert ids(results) == [nearer.id, near.id, far.id]
    assert results[0].image_id == nearer_img.id and results[0].external_id == nearer.external_id
    assert results[0].score > results[1].score > results[2].score
    assert results[0].score == pytest.approx(1 / np.sqrt(1 + 0.3**2), abs=0.02)
    assert query(search, base, k=1) == [nearer.id]


def test_raw_index_hits_are_cosine_scored_and_filtered_by_kind(search: SearchEnv) -> None:
    base = search.vector()
    listing, image = search.add(search.vector(), region=base)
    hits = search.index.query(search.session, base, 5, IndexFilters(kind="region"))
    assert [(h.image_id, h.listing_id, h.kind) for h in hits][:1] == [(image.id, listing.id, "region")]
    assert hits[0].score == pytest.approx(1.0, abs=0.01)
    full_hits = search.index.query(search.session, base, 5, IndexFilters(kind="full"))
    assert full_hits and full_hits[0].score < 0.5
    assert search.index.count(search.session, "region") >= 1


def test_filters(search: SearchEnv) -> None:
    base = search.vector()
    cup, _ = search.add(search.vector(base, 0.3), category="kitchenware", labels=("cup",),
                        tags=(("red", "colour"),), seller="a")
    shoe, _ = search.add(search.vector(base, 0.5), tags=(("shoes", "category-map"), ("white", "colour")),
                         labels=("shoe",), seller="b")
    pending, _ = search.add(search.vector(base, 0.8), status="processing", seller="c")
    assert query(search, base, category="kitchenware") == [cup.id]
    assert query(search, base, category="shoes") == [shoe.id]  # predicted category tag
    assert query(search, base, object_label="shoe") == [shoe.id]
    assert query(search, base, colour="red") == [cup.id]
    assert query(search, base, sellers=("b", "c")) == [shoe.id, pending.id]
    assert query(search, base, exclude_sellers=("a",)) == [shoe.id, pending.id]
    assert query(search, base, statuses=("done",)) == [cup.id, shoe.id]
    assert query(search, base, colour="green") == []


def test_selective_filter_still_finds_the_few_that_pass(search: SearchEnv) -> None:
    base = search.vector()
    for _ in range(60):
        search.add(search.vector(base, 0.3), seller="crowd")
    rare, _ = search.add(search.vector(base, 1.5), seller="rare")
    assert query(search, base, k=5, sellers=("rare",)) == [rare.id]


def test_deleted_listing_and_failed_image_are_never_returned(search: SearchEnv) -> None:
    base = search.vector()
    gone, _ = search.add(search.vector(base, 0.3))
    failed, failed_img = search.add(search.vector(base, 0.35))
    status_only, _ = search.add(search.vector(base, 0.4))
    kept, _ = search.add(search.vector(base, 0.6))
    assert set(query(search, base)) == {gone.id, failed.id, status_only.id, kept.id}
    # listing.deleted: its vectors leave the index in the event's transaction
    gone.status = "deleted"
    assert remove_listing_vectors(search.session, gone.id) == 2
    # an image that fails loses its results, vectors included
    clear_results(search.session, failed_img.id)
    failed_img.status = "failed"
    # a deleted listing whose vectors are still there (an older release) is filtered out too
    status_only.status = "deleted"
    search.session.flush()
    assert query(search, base) == [kept.id]
    rows = search.session.execute(select(m.SearchVector.listing_id)).scalars().all()
    assert gone.id not in rows and failed.id not in rows


def test_failed_image_with_vectors_left_is_filtered_out(search: SearchEnv) -> None:
    base = search.vector()
    listing, image = search.add(search.vector(base, 0.3))
    other, _ = search.add(search.vector(base, 0.6))
    image.status = "failed"
    search.session.flush()
    assert query(search, base) == [other.id]


def test_updated_image_is_reindexed(search: SearchEnv) -> None:
    old, new = search.vector(), search.vector()
    listing, image = search.add(old)
    other, _ = search.add(search.vector(old, 0.5))
    assert query(search, old, k=1) == [listing.id]
    search.index.upsert(search.session, image.id, listing.id, {"full": (new, VERSION), "region": (new, VERSION)})
    search.session.flush()
    assert query(search, old, k=1) == [other.id]
    assert query(search, new, k=1) == [listing.id]
    [top] = similar(search.session, search.settings, SimilarQuery(vector=new, k=1))
    assert top.score == pytest.approx(1, abs=0.01)
    assert len(search.session.execute(select(m.SearchVector).where(m.SearchVector.image_id == image.id)).all()) == 2


def test_own_seller_and_own_listing_are_left_out_by_default(search: SearchEnv) -> None:
    base = search.vector()
    mine, my_img = search.add(base, seller="me")
    my_other, _ = search.add(search.vector(base, 0.3), seller="me")
    theirs, _ = search.add(search.vector(base, 0.6), seller="them")
    qv = vector_for_image(search.session, search.settings, my_img.id)
    assert (qv.image_id, qv.listing_id, qv.seller_id) == (my_img.id, mine.id, "me")
    found = similar(search.session, search.settings, SimilarQuery.from_vector(qv))
    assert ids(found) == [theirs.id]
    with_own = similar(search.session, search.settings, SimilarQuery.from_vector(qv, include_own_seller=True))
    assert ids(with_own) == [my_other.id, theirs.id]  # never the query listing itself


def test_near_identical_photos_collapse_into_one_result(search: SearchEnv) -> None:
    base = search.vector()
    # vectors far enough apart (cosine < 0.97) that only the photos' own evidence links them
    first, _ = search.add(search.vector(base, 0.3), seller="a", sha256="ab" * 32)
    same_bytes, same_img = search.add(search.vector(base, 0.5), seller="b", sha256="ab" * 32)
    hashed, _ = search.add(search.vector(base, 0.55), seller="c", phash=0x0F0F, dhash=0x00FF)
    hash_twin, twin_img = search.add(search.vector(base, 0.6), seller="d", phash=0x0F0E, dhash=0x00FF)
    near_vec = search.vector(base, 0.65)
    close, _ = search.add(near_vec, seller="e")
    close_copy, copy_img = search.add(search.vector(near_vec, 0.05), seller="f")  # cosine ~0.999
    different, _ = search.add(search.vector(base, 0.8), seller="g", phash=-1, dhash=-1)
    results = similar(search.session, search.settings, SimilarQuery(vector=base, k=10))
    assert ids(results) == [first.id, hashed.id, close.id, different.id]
    by_listing = {r.listing_id: r for r in results}
    assert by_listing[first.id].collapsed == [same_img.id]
    assert by_listing[hashed.id].collapsed == [twin_img.id]  # pHash+dHash 1 bit apart
    assert by_listing[close.id].collapsed == [copy_img.id]  # vectors nearly identical
    assert by_listing[different.id].collapsed == []
    plain = similar(search.session, search.settings, SimilarQuery(vector=base, k=10, collapse=False))
    assert set(ids(plain)) == {first.id, same_bytes.id, hashed.id, hash_twin.id, close.id, close_copy.id,
                               different.id}


def test_a_duplicate_flag_links_photos_for_collapsing(search: SearchEnv) -> None:
    base = search.vector()
    original, original_img = search.add(search.vector(base, 0.3), seller="a")
    stolen, stolen_img = search.add(search.vector(base, 0.6), seller="b")
    search.session.add(m.Flag(listing_id=stolen.id, image_id=stolen_img.id, kind="duplicate_image", score=0.9,
                              evidence={"first_upload": {"image_id": original_img.id}}))
    search.session.flush()
    results = similar(search.session, search.settings, SimilarQuery(vector=base, k=10))
    assert ids(results) == [original.id] and results[0].collapsed == [stolen_img.id]


def test_one_result_per_listing_with_its_best_image(search: SearchEnv) -> None:
    base = search.vector()
    listing, weak = search.add(search.vector(base, 0.8))
    _, strong = search.add(search.vector(base, 0.3), listing=listing)
    results = similar(search.session, search.settings, SimilarQuery(vector=base, k=5, collapse=False))
    assert ids(results) == [listing.id]
    assert results[0].image_id == strong.id and results[0].collapsed == [weak.id]


def test_why_names_the_shared_tags(search: SearchEnv) -> None:
    base = search.vector()
    _, q_img = search.add(base, seller="q", tags=(("cup", "imagenet"), ("red", "colour")), labels=("cup",))
    other, _ = search.add(search.vector(base, 0.3), seller="o", tags=(("red", "colour"), ("plate", "imagenet")),
                          labels=("cup",))
    qv = vector_for_image(search.session, search.settings, q_img.id)
    [result] = similar(search.session, search.settings, SimilarQuery.from_vector(qv))
    assert result.listing_id == other.id and set(result.why) == {"red", "cup"}


def test_listing_and_image_errors(search: SearchEnv) -> None:
    s, settings = search.session, search.settings
    listing, image = search.add(search.vector())
    assert vector_for_listing(s, settings, listing.external_id).image_id == image.id
    assert vector_for_listing(s, settings, listing.id).image_id == image.id
    cases = {"unknown_listing": lambda: vector_for_listing(s, settings, "no-such-listing"),
             "unknown_image": lambda: vector_for_image(s, settings, 10**9)}
    failed_listing, failed_img = search.add(search.vector(), image_status="failed")
    failed_img.error = "decode_error: not an image"
    cases["image_failed"] = lambda: vector_for_image(s, settings, failed_img.id)
    cases["image_failed "] = lambda: vector_for_listing(s, settings, failed_listing.external_id)
    _, pending_img = search.add(search.vector(), image_status="pending")
    cases["image_pending"] = lambda: vector_for_image(s, settings, pending_img.id)
    deleted, _ = search.add(search.vector(), status="deleted")
    cases["listing_deleted"] = lambda: vector_for_listing(s, settings, deleted.external_id)
    bare = m.Image(listing_id=listing.id, url="https://shop.example/bare.jpg", status="done", position=5)
    s.add(bare)
    s.flush()
    cases["no_embedding"] = lambda: vector_for_image(s, settings, bare.id)
    s.flush()
    for code, call in cases.items():
        with pytest.raises(SearchError) as info:
            call()
        assert info.value.code == code.strip(), code
        assert str(info.value).endswith(".") and "\n" not in str(info.value)
    for k in (0, 101, -1, True):
        with pytest.raises(SearchError, match="k must be") as info:
            similar(s, settings, SimilarQuery(vector=search.vector(), k=k))
        assert info.value.code == "bad_request" and info.value.status == 422
    with pytest.raises(SearchError, match="zero"):
        similar(s, settings, SimilarQuery(vector=np.zeros(1280, np.float32)))
    with pytest.raises(SearchError, match="status"):
        similar(s, settings, SimilarQuery(vector=search.vector(), statuses=("deleted",)))


def test_health_and_counts(search: SearchEnv) -> None:
    before = search.index.count(search.session, "full")
    search.add(search.vector())
    search.add(search.vector())
    assert search.index.count(search.session, "full") == before + 2
    health = search.index.health(search.session)
    assert health.backend == search.backend and health.counts["region"] == before + 2
    assert ("pgvector" in health.detail) == (search.backend == "pgvector")
