"""Reviewed labels, one function at a time, on SQLite and Postgres: what each row records (who,
source, what changed, the model version it corrects, the split), supersession with history,
the fixed split, and a clear refusal for bad input."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from db import models as m
from db.session import transaction
from tests.support.labels import Catalogue
from worker import labels
from worker.config import load_settings
from worker.labels.store import split_for
from worker.review import queue


def _rows(url: str, image_id: int, kind: str) -> list[m.Label]:
    with transaction(url) as s:
        return list(s.execute(select(m.Label).where(m.Label.image_id == image_id, m.Label.kind == kind)
                              .order_by(m.Label.id)).scalars())


def test_confirm_and_reject_tag_record_the_model_version_and_supersede(catalogue: Catalogue) -> None:
    url = catalogue.url
    with transaction(url) as s:
        first = labels.confirm_tag(s, catalogue.image, "backpack", "alice", note="clearly a backpack")
    assert (first.kind, first.action, first.name, first.source, first.reviewer) == (
        "tag", "confirm", "backpack", "review", "alice")
    assert first.corrects_model_version == "tagging-test-1"
    assert first.previous == {"model": {"name": "backpack", "score": 0.7, "source": "imagenet",
                                        "model_version": "tagging-test-1"}, "label": None}
    assert first.split == split_for(catalogue.image, None, 20) and first.active
    with transaction(url) as s:
        second = labels.reject_tag(s, catalogue.image, "backpack", "bob")
    assert second.superseded == (first.id,)
    assert second.previous is not None and second.previous["label"]["id"] == first.id
    assert second.previous["label"]["reviewer"] == "alice"
    rows = _rows(url, catalogue.image, "tag")
    assert [(r.id, r.action, r.active) for r in rows] == [(first.id, "confirm", False), (second.id, "reject", True)]
    with transaction(url) as s:
        history = labels.label_history(s, image_id=catalogue.image)
    assert [h.id for h in history] == [first.id, second.id]


def test_tag_input_is_checked(catalogue: Catalogue) -> None:
    with pytest.raises(labels.UnknownTarget, match=r"has no tag 'sofa' to reject \(its tags: backpack, bags\)"), \
            transaction(catalogue.url) as s:
        labels.reject_tag(s, catalogue.image, "sofa", "alice")
    with pytest.raises(labels.UnknownTarget, match="image 999999999 does not exist"), transaction(catalogue.url) as s:
        labels.confirm_tag(s, 999_999_999, "bags", "alice")
    with pytest.raises(labels.InvalidLabel, match="reviewer is empty"), transaction(catalogue.url) as s:
        labels.confirm_tag(s, catalogue.image, "bags", "  ")
    # Confirming a tag the model did not give is a new positive label that corrects no model.
    with transaction(catalogue.url) as s:
        new = labels.confirm_tag(s, catalogue.image, "leather bag", "alice")
    assert new.corrects_model_version is None and new.previous is None
    with transaction(catalogue.url) as s:
        s.get_one(m.Listing, s.get_one(m.Image, catalogue.lone).listing_id).status = "deleted"
    with pytest.raises(labels.UnknownTarget, match="deleted listing"), transaction(catalogue.url) as s:
        labels.confirm_tag(s, catalogue.lone, "bags", "alice")


def test_category_of_an_image_and_of_a_listing(catalogue: Catalogue) -> None:
    url = catalogue.url
    with transaction(url) as s:
        first = labels.set_category(s, "shoes", "alice", image_id=catalogue.image)
        second = labels.set_category(s, "bags", "bob", image_id=catalogue.image)
    assert first.corrects_model_version == "tagging-test-1"
    assert first.previous == {"model": {"name": "bags", "score": 0.8, "source": "category-map",
                                        "model_version": "tagging-test-1"}, "label": None}
    # One true category per image: a different name supersedes too.
    assert second.superseded == (first.id,) and second.previous["label"]["name"] == "shoes"  # type: ignore[index]
    with transaction(url) as s:
        whole = labels.set_category(s, "shoes", "carol", listing_external_id=catalogue.listing)
        listing_id = s.execute(select(m.Listing.id).where(m.Listing.external_id == catalogue.listing)).scalar_one()
    assert whole.listing_id == listing_id and whole.image_id is None
    assert whole.split == split_for(None, listing_id, 20)
    # The best category over the listing's images, and what the seller declared.
    assert whole.previous is not None and whole.previous["model"]["name"] == "bags"
    assert whole.previous["model"]["seller_category"] == "bags"
    assert whole.superseded == ()  # the image's own label is a different target


def test_unknown_category_is_refused_with_a_suggestion_unless_new(catalogue: Catalogue) -> None:
    with pytest.raises(labels.UnknownCategory, match=r"unknown category 'shoez' \(did you mean 'shoes'"), \
            transaction(catalogue.url) as s:
        labels.set_category(s, "shoez", "alice", image_id=catalogue.image)
    with transaction(catalogue.url) as s:
        # The seller's "bags" and the taxonomy's categories are known; a shop-only one needs the flag.
        assert {"bags", "shoes", "furniture"} <= labels.known_categories(s)
        labels.set_category(s, "vegan handbags", "alice", image_id=catalogue.image, new_category=True)
    with transaction(catalogue.url) as s:
        assert "vegan handbags" in labels.known_categories(s)
        labels.set_category(s, "vegan handbags", "bob", image_id=catalogue.second)  # now known
    with pytest.raises(labels.InvalidLabel, match="either an image or a listing"), transaction(catalogue.url) as s:
        labels.set_category(s, "bags", "alice", image_id=catalogue.image, listing_external_id=catalogue.listing)
    with pytest.raises(labels.UnknownTarget, match="listing 'nope' does not exist"), transaction(catalogue.url) as s:
        labels.set_category(s, "bags", "alice", listing_external_id="nope")


def test_boxes_add_correct_delete(catalogue: Catalogue) -> None:
    url = catalogue.url
    with transaction(url) as s:
        fixed = labels.correct_box(s, catalogue.detection, (90, 40, 310, 260), "alice", image_id=catalogue.image)
        again = labels.correct_box(s, catalogue.detection, (95, 45, 305, 255), "bob", label="backpack")
        gone = labels.delete_box(s, catalogue.other_detection, "alice")
        added = labels.add_box(s, catalogue.image, "wallet", (400, 300, 500, 400), "alice")
    assert (fixed.action, fixed.name, fixed.box, fixed.detection_id) == ("correct", "handbag", (90, 40, 310, 260),
                                                                        catalogue.detection)
    assert fixed.corrects_model_version == "yolo-test-1"
    assert fixed.previous["model"]["box"] == [100, 50, 300, 250]  # type: ignore[index]
    assert again.name == "backpack" and again.superseded == (fixed.id,)
    assert (gone.action, gone.box, gone.image_id, gone.name) == ("delete", None, catalogue.second, "person")
    assert (added.action, added.detection_id, added.corrects_model_version) == ("add", None, None)
    assert [r.active for r in _rows(url, catalogue.image, "box")] == [False, True, True]


@pytest.mark.parametrize(("call", "message"), [
    (lambda s, c: labels.add_box(s, c.image, "wallet", (600, 10, 700, 50), "a"), r"outside image \d+ \(640x480"),
    (lambda s, c: labels.add_box(s, c.image, "wallet", (50, 10, 40, 50), "a"), "is empty: it needs x0 < x1"),
    (lambda s, c: labels.add_box(s, c.image, "wallet", (1, 2, 3), "a"), "four finite numbers"),  # type: ignore[arg-type]
    (lambda s, c: labels.add_box(s, c.image, "wallet", (1, 2, 3, float("nan")), "a"), "four finite numbers"),
    (lambda s, c: labels.add_box(s, c.unsized, "wallet", (1, 2, 3, 4), "a"), "no known size"),
    (lambda s, c: labels.add_box(s, c.image, " ", (1, 2, 3, 4), "a"), "box label is empty"),
    (lambda s, c: labels.correct_box(s, c.detection, (1, 2, 3, 4), "a", image_id=c.second),
     r"detection \d+ belongs to image \d+, not"),
    (lambda s, c: labels.delete_box(s, 999_999_999, "a"), "detection 999999999 does not exist"),
])
def test_bad_boxes_are_refused(catalogue: Catalogue, call, message: str) -> None:
    with pytest.raises(labels.LabelError, match=message), transaction(catalogue.url) as s:
        call(s, catalogue)
    assert _rows(catalogue.url, catalogue.image, "box") == []


def test_attributes_supersede_by_name(catalogue: Catalogue) -> None:
    with transaction(catalogue.url) as s:
        leather = labels.set_attribute(s, "Material", "leather", "alice", image_id=catalogue.image)
        striped = labels.set_attribute(s, "pattern", "striped", "alice", image_id=catalogue.image)
        suede = labels.set_attribute(s, "material", "suede", "bob", image_id=catalogue.image)
    assert (leather.name, leather.value) == ("material", "leather")
    assert suede.superseded == (leather.id,) and striped.superseded == ()
    active = [(r.name, r.value) for r in _rows(catalogue.url, catalogue.image, "attribute") if r.active]
    assert active == [("pattern", "striped"), ("material", "suede")]
    with pytest.raises(labels.InvalidLabel, match="value of attribute 'colour' is empty"), \
            transaction(catalogue.url) as s:
        labels.set_attribute(s, "colour", "", "alice", image_id=catalogue.image)


def test_split_is_a_stable_hash_with_the_configured_share() -> None:
    splits = [split_for(i, None, 20) for i in range(1, 5001)]
    assert splits == [split_for(i, None, 20) for i in range(1, 5001)]
    share = splits.count("heldout") / len(splits)
    assert 0.18 < share < 0.22, share
    assert {split_for(i, None, 0) for i in range(200)} == {"train"}
    assert {split_for(i, None, 100) for i in range(200)} == {"heldout"}
    # Pinned values: the formula is documented (docs/labels.md) and must not drift.
    import hashlib
    for i in (1, 2, 3, 42):
        bucket = int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") % 100
        assert split_for(i, None, 20) == ("heldout" if bucket < 20 else "train")
    with pytest.raises(labels.InvalidLabel, match="0-100"):
        split_for(1, None, 120)


def test_an_image_keeps_its_split_when_the_share_changes(catalogue: Catalogue) -> None:
    with transaction(catalogue.url) as s:
        first = labels.confirm_tag(s, catalogue.image, "backpack", "alice", heldout=0)
    assert first.split == "train"
    with transaction(catalogue.url) as s:
        # Everything new would be held out now, but this image already is in train: it stays.
        later = labels.set_category(s, "bags", "alice", image_id=catalogue.image, heldout=100)
        fresh = labels.set_category(s, "bags", "alice", image_id=catalogue.second, heldout=100)
    assert later.split == "train" and fresh.split == "heldout"


def test_default_share_comes_from_the_setting(catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.config import reset_settings

    monkeypatch.setenv("CATALOG_LABEL_HELDOUT_PERCENT", "100")
    reset_settings()
    with transaction(catalogue.url) as s:
        assert labels.confirm_tag(s, catalogue.image, "bags", "alice").split == "heldout"


def test_flag_verdict_becomes_a_label(catalogue: Catalogue, make_settings) -> None:
    settings = make_settings()
    with transaction(catalogue.url) as s:
        flag = s.get_one(m.Flag, catalogue.flag)
        flag.status, flag.claimed_by = "claimed", "alice"
        flag.claim_expires_at = m.utcnow() + timedelta(minutes=10)
    with transaction(catalogue.url) as s:
        queue.resolve_flag(s, catalogue.flag, "alice", "dismissed", "other photo", settings=settings)
    (row,) = _rows(catalogue.url, catalogue.image, "flag_verdict")
    assert (row.action, row.value, row.name, row.flag_id, row.reviewer, row.note) == (
        "reject", "dismissed", "duplicate_image", catalogue.flag, "alice", "other photo")
    assert row.corrects_model_version == "fraud-test-1" and row.split == split_for(catalogue.image, None, 20)


def test_weak_seller_categories_stay_apart(catalogue: Catalogue) -> None:
    with transaction(catalogue.url) as s:
        labels.set_category(s, "shoes", "alice", listing_external_id=catalogue.listing)
        mine = (catalogue.listing, catalogue.other)
        weak = [w for w in labels.weak_category_labels(s) if w.listing_external_id in mine]
        stats = labels.label_stats(s)
        stored = s.execute(select(m.Label.source).distinct()).scalars().all()
    assert [(w.listing_external_id, w.category, w.source) for w in weak] == [(catalogue.listing, "bags", "seller")]
    assert "seller" not in stored
    assert stats.by_kind["category"]["train"] + stats.by_kind["category"]["heldout"] == 1
    assert stats.categories == {"shoes": stats.by_kind["category"]} and stats.weak_categories >= 1


def test_setting_is_validated() -> None:
    with pytest.raises(Exception, match="CATALOG_LABEL_HELDOUT_PERCENT"):
        load_settings(label_heldout_percent=101)


def test_concurrent_reviewers_leave_one_active_label_and_a_chain_of_history(catalogue: Catalogue) -> None:
    categories = ["bags", "shoes", "watches", "phones", "furniture", "home decor", "bags", "shoes"]
    errors: list[BaseException] = []
    start = threading.Barrier(len(categories))

    def review(i: int, category: str) -> None:
        try:
            start.wait()
            with transaction(catalogue.url) as s:
                labels.set_category(s, category, f"reviewer-{i}", image_id=catalogue.image)
        except Exception as exc:  # noqa: BLE001  (reported below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=review, args=(i, c)) for i, c in enumerate(categories)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = _rows(catalogue.url, catalogue.image, "category")
    assert len(rows) == len(categories) and sum(r.active for r in rows) == 1
    # Each label replaced exactly the one before it: no two saw the same active label.
    replaced = [r.previous["label"]["id"] for r in rows if r.previous and r.previous["label"]]
    assert sorted(replaced) == [r.id for r in rows[:-1]]
    assert rows[-1].active
