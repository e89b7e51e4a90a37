"""Tag search (`catalog search`, GET /api/v1/search): terms in English or zh-CN, ranking by terms
matched then score, why, filters, and what never matches (deleted listings, failed photos,
tags a reviewer rejected). On SQLite and on Postgres."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.orm import Session

from db import models as m
from db.session import session_factory
from worker.config import Settings
from worker.search.tags import (
    DEFAULT_TAXONOMY,
    SearchQueryError,
    Vocabulary,
    name_matches,
    parse_query,
    render,
    search_tags,
)


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    """A session whose writes are undone afterwards (the Postgres database is shared)."""
    with session_factory(db_url)() as s:
        s.begin()
        try:
            yield s
        finally:
            s.rollback()


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


def add_listing(session: Session, name: str, tags: list[tuple[str, float, str]], *, status: str = "done",
                image_status: str = "done", category: str | None = None, seller: str = "s1") -> m.Listing:
    listing = m.Listing(external_id=f"{name}-{uuid.uuid4().hex[:8]}", seller_id=seller, title=name,
                        category=category, status=status)
    session.add(listing)
    session.flush()
    image = m.Image(listing_id=listing.id, url=f"https://shop.example/{name}.jpg", status=image_status)
    session.add(image)
    session.flush()
    for tag, score, source in tags:
        session.add(m.Tag(listing_id=listing.id, image_id=image.id, name=tag, score=score, source=source,
                          model_version="test"))
    session.flush()
    return listing


@pytest.fixture
def catalogue(session: Session) -> dict[str, Any]:
    red_cup = add_listing(session, "red-cup", [("cup", 0.8, "detection"), ("red", 0.5, "colour"),
                                               ("kitchenware", 0.7, "category-map")])
    white_cup = add_listing(session, "white-cup", [("cup", 0.9, "detection"), ("white", 0.6, "colour"),
                                                   ("kitchenware", 0.6, "category-map")])
    red_shoe = add_listing(session, "red-shoe", [("running shoe", 0.7, "imagenet"), ("red", 0.4, "colour"),
                                                 ("shoes", 0.6, "category-map")], category="shoes")
    grey_bag = add_listing(session, "grey-bag", [("backpack", 0.6, "imagenet"), ("dark grey", 0.7, "colour"),
                                                 ("material:leather", 0.8, "attribute-head")])
    deleted = add_listing(session, "deleted", [("cup", 0.99, "detection"), ("red", 0.99, "colour")],
                          status="deleted")
    failed = add_listing(session, "failed", [("cup", 0.99, "detection"), ("red", 0.99, "colour")],
                         image_status="failed")
    rejected = add_listing(session, "rejected", [("cup", 0.95, "detection"), ("red", 0.95, "colour")])
    rejected_image = rejected.images[0] if rejected.images else session.query(m.Image).filter_by(
        listing_id=rejected.id).one()
    session.add(m.Label(image_id=rejected_image.id, kind="tag", action="reject", name="cup", source="review",
                        reviewer="alice", split="train", active=True))
    session.flush()
    return {"red_cup": red_cup.external_id, "white_cup": white_cup.external_id,
            "red_shoe": red_shoe.external_id, "grey_bag": grey_bag.external_id,
            "deleted": deleted.external_id, "failed": failed.external_id, "rejected": rejected.external_id}


def ours(result: Any, catalogue: dict[str, Any]) -> list[str]:
    """The hits among this test's listings (the Postgres database may hold others')."""
    names = {v: k for k, v in catalogue.items()}
    return [names[h.listing] for h in result.hits if h.listing in names]


def test_red_cup_ranks_by_terms_matched_then_score_with_why(session: Session, settings: Settings,
                                                             catalogue: dict[str, Any]) -> None:
    result = search_tags(session, settings, "red cup", k=100)
    assert [t["text"] for t in result.terms] == ["red", "cup"]
    # Both terms first; then one term each, higher score first (the rejected cup's red 0.95,
    # white cup 0.9, red shoe 0.4).
    assert ours(result, catalogue) == ["red_cup", "rejected", "white_cup", "red_shoe"]
    top = next(h for h in result.hits if h.listing == catalogue["red_cup"])
    assert top.matched == 2 and top.score == pytest.approx(1.3)
    assert {(r.term, r.tag, r.source) for r in top.why} == {("red", "red", "colour"), ("cup", "cup", "detection")}
    text = render(result)
    assert catalogue["red_cup"] in text and "cup = cup (detection 0.80" in text


def test_deleted_listings_failed_photos_and_rejected_tags_never_match(session: Session, settings: Settings,
                                                                       catalogue: dict[str, Any]) -> None:
    hits = {h.listing: h for h in search_tags(session, settings, "cup", k=100).hits}
    assert catalogue["deleted"] not in hits and catalogue["failed"] not in hits
    assert catalogue["rejected"] not in hits  # its only cup tag was rejected by a reviewer
    red = {h.listing: h for h in search_tags(session, settings, "red", k=100).hits}
    assert catalogue["rejected"] in red  # its other tags still count


def test_zh_cn_query_finds_the_same_listings(session: Session, settings: Settings,
                                             catalogue: dict[str, Any]) -> None:
    english = search_tags(session, settings, "red cup", k=100)
    chinese = search_tags(session, settings, "红色杯子", k=100)
    assert [t["text"] for t in chinese.terms] == ["红色", "杯子"]
    assert ours(chinese, catalogue) == ours(english, catalogue)
    top = next(h for h in chinese.hits if h.listing == catalogue["red_cup"])
    assert {(r.term, r.tag) for r in top.why} == {("红色", "red"), ("杯子", "cup")}
    # A category in Chinese, as a term and as a filter.
    assert ours(search_tags(session, settings, "鞋子", k=100), catalogue)[:1] == ["red_shoe"]
    filtered = search_tags(session, settings, "红色", k=100, category="鞋子")
    assert filtered.category == "shoes" and ours(filtered, catalogue) == ["red_shoe"]


def test_phrases_words_plurals_and_attribute_values(session: Session, settings: Settings,
                                                    catalogue: dict[str, Any]) -> None:
    # "dark grey" is one term (a colour name), not "dark" + "grey"
    result = search_tags(session, settings, "dark grey leather bag", k=100)
    assert [t["text"] for t in result.terms] == ["dark grey", "leather", "bag"]
    assert ours(result, catalogue)[0] == "grey_bag"
    assert ours(search_tags(session, settings, "shoe", k=100), catalogue) == ["red_shoe"]  # running shoe, shoes
    assert ours(search_tags(session, settings, "cups", k=100), catalogue) == ["white_cup", "red_cup"]
    category = search_tags(session, settings, "red", k=100, category="kitchenware")
    assert ours(category, catalogue) == ["red_cup"]  # predicted category tag


def test_bad_queries_are_one_sentence(session: Session, settings: Settings) -> None:
    for query, words in (("", "no words"), ("  ?? ! ", "no words"), ("the and of", "no words"),
                         ("x" * 201, "at most 200")):
        with pytest.raises(SearchQueryError, match=words):
            search_tags(session, settings, query)
    for k in (0, 101):
        with pytest.raises(SearchQueryError, match="k must be between 1 and 100"):
            search_tags(session, settings, "cup", k=k)


def test_wildcards_in_a_query_are_literal(session: Session, settings: Settings,
                                               catalogue: dict[str, Any]) -> None:
    assert ours(search_tags(session, settings, "c_p", k=100), catalogue) == []
    assert ours(search_tags(session, settings, "cu%", k=100), catalogue) == []
    assert not name_matches("cup", ["c_p"]) and name_matches("measuring cup", ["cup"])
    assert name_matches("material:leather", ["leather"]) and not name_matches("cupboard", ["cup"])


def test_every_category_and_colour_has_a_zh_cn_name() -> None:
    from worker.steps.colours import NAMED_COLOURS
    from worker.steps.tagging import DEFAULT_TAXONOMY as TAGGING_TAXONOMY
    from worker.steps.tagging import Taxonomy

    assert DEFAULT_TAXONOMY == TAGGING_TAXONOMY
    data = yaml.safe_load(DEFAULT_TAXONOMY.read_text(encoding="utf-8"))
    zh = data["names"]["zh-CN"]
    assert set(zh["categories"]) == set(data["categories"])
    assert set(zh["colours"]) == set(NAMED_COLOURS)
    assert all(names and all(isinstance(n, str) and n.strip() for n in names)
               for section in zh.values() for names in section.values())
    # The tagging step still reads the file (the names block is ignored there).
    assert len(Taxonomy.load(DEFAULT_TAXONOMY).names) == len(data["categories"])


def test_an_operator_taxonomy_without_names_keeps_the_shipped_translations(tmp_path: Path) -> None:
    own = tmp_path / "taxonomy.yaml"
    own.write_text("categories:\n  mugs: [coffee mug]\n", encoding="utf-8")
    vocab = Vocabulary.from_files([DEFAULT_TAXONOMY, own])
    assert vocab.categories == ("mugs",)
    assert [t.text for t in parse_query("红色 mugs", vocab)] == ["红色", "mugs"]
    assert vocab.english("红色") == "red"
