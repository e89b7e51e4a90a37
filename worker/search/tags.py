"""Tag search: ``catalog search "red cup"`` and ``GET /api/v1/search?q=`` over what the worker
stored about each photo (ImageNet labels, catalog categories, detection labels, colour names,
attribute values), in English or in the other languages of the taxonomy file.

A query is cut into **terms**: first the longest known names (English category, colour and
detection-label names, and every name of the taxonomy's ``names`` block, e.g. zh-CN "红色" ->
``red``, "杯子" -> ``cup``; Chinese needs no spaces: "红色杯子" is two terms), then the words
that are left. A term matches a stored tag whose name is the term, or holds it as a whole word
("cup" matches ``cup`` and ``measuring cup``, "leather" matches ``material:leather``); a plain
English word also matches its singular/plural. Listings are ranked by how many terms they
match, then by the sum of each matched term's best tag score; every hit says why (which tag
matched which term, with its source, score and image).

Only photos that were analysed (``images.status = 'done'``) of listings that are not deleted
count, and a tag a reviewer rejected (an active ``reject`` label) never matches. The ranking
is one SQL statement (a ``UNION ALL`` of one grouped select per term), the same on SQLite and
Postgres, on exact tag names: each term's names are found first among the distinct stored
names (a loose scan of the name index), so no pattern is matched against every tag row. The
details are read for the top ``k`` listings only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, exists, func, literal, or_, select, text, union_all
from sqlalchemy.orm import Session, aliased

from db import models as m
from worker.config import Settings

#: The taxonomy shipped in the package (the same file the tagging step reads by default).
DEFAULT_TAXONOMY = Path(__file__).resolve().parents[1] / "data" / "taxonomy.yaml"
#: Tag sources that name a catalog category (the taxonomy map or a trained head).
CATEGORY_SOURCES = ("category-map", "category-head")
MAX_K = 100
MAX_QUERY_CHARS = 200
MAX_TERMS = 12
#: English words that carry no meaning for a tag search.
STOP_WORDS = frozenset({"a", "an", "the", "and", "or", "with", "for", "of", "in", "on", "to", "my"})
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


class SearchQueryError(ValueError):
    """The query cannot be searched (empty, too long, k out of range); one sentence."""


# --- vocabulary: the names a query may use -----------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """Known names (lower case) -> the English tag names they stand for.

    English names come from the taxonomy's categories and from the keys of its ``names``
    block (colours, detection labels); other languages' names from that block's values."""

    names: dict[str, frozenset[str]]
    languages: tuple[str, ...]
    categories: tuple[str, ...]
    longest: int = 1
    #: English tag name -> {language: the name shown (the first one listed)}
    shown: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_files(cls, paths: Sequence[Path]) -> Vocabulary:
        """Later files override earlier ones name by name (the shipped file first, then the
        operator's ``CATALOG_TAXONOMY_PATH``, which may carry no ``names`` block at all)."""
        import yaml

        names: dict[str, set[str]] = {}
        shown: dict[str, dict[str, str]] = {}
        languages: list[str] = []
        categories: list[str] = []

        def add(name: str, english: str) -> None:
            key = normalise(name)
            if key:
                names.setdefault(key, set()).add(english)

        for index, path in enumerate(paths):
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping")
            if index == len(paths) - 1 or not categories:  # the configured file's categories win
                categories = [str(c) for c in (data.get("categories") or {})]
            for language, sections in (data.get("names") or {}).items():
                if language not in languages:
                    languages.append(str(language))
                for section in (sections or {}).values():
                    for english, translated in (section or {}).items():
                        add(str(english), str(english))
                        listed = [translated] if isinstance(translated, str) else list(translated or [])
                        for name in listed:
                            add(str(name), str(english))
                        if listed:
                            shown.setdefault(normalise(str(english)), {}).setdefault(str(language), str(listed[0]))
        for category in categories:
            add(category, category)
        frozen = {key: frozenset(value) for key, value in names.items()}
        return cls(frozen, tuple(languages), tuple(categories), max((len(k) for k in frozen), default=1), shown)

    def translations(self, english: str) -> dict[str, str]:
        """``{"zh-CN": "红色"}`` for ``red``: how each language shows this tag name ({} if none)."""
        return dict(self.shown.get(normalise(english), {}))

    def english(self, name: str) -> str | None:
        """The English tag name ``name`` stands for when it is one known name (a category given
        in zh-CN, for instance), else None."""
        found = self.names.get(normalise(name))
        return min(found) if found and len(found) == 1 else None


@functools.lru_cache(maxsize=8)
def _vocabulary(paths: tuple[Path, ...], stamps: tuple[int, ...]) -> Vocabulary:
    return Vocabulary.from_files(paths)


def vocabulary(settings: Settings) -> Vocabulary:
    """The names of the shipped taxonomy and of ``CATALOG_TAXONOMY_PATH`` (reloaded when a
    file changes)."""
    paths = [DEFAULT_TAXONOMY]
    if settings.taxonomy_path and Path(settings.taxonomy_path).resolve() != DEFAULT_TAXONOMY:
        paths.append(Path(settings.taxonomy_path))
    return _vocabulary(tuple(paths), tuple(p.stat().st_mtime_ns for p in paths))


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


# --- terms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One thing the query asks for: ``text`` as typed, the names it matches."""

    text: str
    names: tuple[str, ...]  # lower-case tag names (or words) to look for

    def variants(self) -> tuple[str, ...]:
        return self.names


def _word_variants(word: str) -> tuple[str, ...]:
    """A plain English word and its likely singular/plural ("cups" <-> "cup", "bag" -> "bags")."""
    out = [word]
    if word.isascii() and word.isalpha() and len(word) > 2:
        if word.endswith("es") and len(word) > 4:
            out.append(word[:-2])
        if word.endswith("s") and not word.endswith("ss"):
            out.append(word[:-1])
        else:
            out.append(word + "s")
    return tuple(dict.fromkeys(out))


def parse_query(query: str, vocab: Vocabulary) -> list[Term]:
    """Cut ``query`` into terms: longest known names first (so "dark grey" or "红色" is one
    term, Chinese needs no spaces), then the remaining words; stop words are dropped."""
    text = normalise(query)
    terms: list[Term] = []
    i = 0
    pending = ""  # characters that are no known name yet

    def flush() -> None:
        nonlocal pending
        for word in _WORD.findall(pending):
            if word not in STOP_WORDS:
                terms.append(Term(word, _word_variants(word)))
        pending = ""

    while i < len(text):
        match = None
        if i == 0 or not _is_word_char(text[i - 1]) or not text[i].isascii():
            for size in range(min(vocab.longest, len(text) - i), 0, -1):
                candidate = text[i:i + size]
                end = i + size
                if candidate in vocab.names and (
                        not candidate[-1].isascii() or end == len(text) or not _is_word_char(text[end])):
                    match = candidate
                    break
        if match is None:
            pending += text[i]
            i += 1
            continue
        flush()
        names = sorted(normalise(n) for n in vocab.names[match])
        if match.isascii() and match not in names:
            names.insert(0, match)
        terms.append(Term(match, tuple(dict.fromkeys(v for n in names for v in _word_variants(n)))))
        i += len(match)
    flush()
    unique: dict[str, Term] = {}
    for term in terms:
        unique.setdefault(term.text, term)
    return list(unique.values())


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() and ch.isascii()


def name_matches(tag_name: str, variants: Iterable[str]) -> bool:
    """``tag_name`` is a variant, or holds one as a whole word (space-separated) or as an
    attribute value (``name:value``); case does not matter."""
    name = tag_name.casefold()
    padded = f" {name} "
    return any(name == v or f" {v} " in padded or name.endswith(":" + v) for v in variants)


#: The distinct tag names, read by a loose index scan over ``ix_tags_name`` (one index probe
#: per distinct name, however many rows carry each): a few thousand names even for millions
#: of tags (ImageNet, COCO, categories, colours, attribute values).
_DISTINCT_NAMES = text(
    "WITH RECURSIVE t(name) AS ("
    " SELECT MIN(name) FROM tags"
    " UNION ALL"
    " SELECT (SELECT MIN(tags.name) FROM tags WHERE tags.name > t.name) FROM t WHERE t.name IS NOT NULL"
    ") SELECT name FROM t WHERE name IS NOT NULL")


def tag_names(session: Session) -> list[str]:
    """Every distinct tag name stored."""
    return [str(name) for name in session.execute(_DISTINCT_NAMES).scalars()]


# --- search --------------------------------------------------------------------------------


@dataclass
class Reason:
    term: str  # as the query wrote it
    tag: str  # the stored tag that matched
    source: str  # imagenet, detection, colour, category-map, ...
    score: float
    image_id: int


@dataclass
class TagHit:
    listing: str  # the shop's listing id
    seller_id: str
    title: str
    category: str | None
    status: str
    image_id: int  # the photo that matched the most terms
    matched: int  # terms matched
    score: float  # sum over matched terms of the best tag score
    why: list[Reason] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TagSearch:
    query: str
    terms: list[dict[str, Any]]  # {"text", "matches": [tag names looked for]}
    category: str | None
    hits: list[TagHit]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "terms": self.terms, "category": self.category,
                "hits": [h.to_dict() for h in self.hits]}


def _rejected() -> ColumnElement[bool]:
    """A reviewer's active rejection of this tag on this image."""
    return exists().where(m.Label.kind == "tag", m.Label.action == "reject", m.Label.active.is_(True),
                          m.Label.image_id == m.Tag.image_id, m.Label.name == m.Tag.name)


def _category_clause(category: str) -> ColumnElement[bool]:
    tag = aliased(m.Tag)
    predicted = exists().where(tag.listing_id == m.Listing.id, tag.name == category,
                               tag.source.in_(CATEGORY_SOURCES))
    return or_(m.Listing.category == category, predicted)


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise SearchQueryError(f"k must be between 1 and {MAX_K}, not {k}")
    return k


def search_tags(session: Session, settings: Settings, query: str, *, k: int = 10,
                category: str | None = None) -> TagSearch:
    """The ``k`` listings whose tags match the most terms of ``query`` (then the highest
    scores), each with why. ``category`` keeps listings declared in that category or whose
    photos were categorised so (English or a taxonomy translation)."""
    check_k(k)
    if len(query) > MAX_QUERY_CHARS:
        raise SearchQueryError(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS} are searched")
    vocab = vocabulary(settings)
    terms = parse_query(query, vocab)
    if not terms:
        raise SearchQueryError("the query has no words to search for")
    if len(terms) > MAX_TERMS:
        raise SearchQueryError(f"the query has {len(terms)} terms; at most {MAX_TERMS} are searched")
    if category is not None:
        category = vocab.english(category) or category.strip()
    described = [{"text": t.text, "matches": list(t.variants())} for t in terms]

    def scoped(stmt: Any) -> Any:
        stmt = (stmt.join(m.Image, m.Image.id == m.Tag.image_id).join(m.Listing, m.Listing.id == m.Tag.listing_id)
                .where(m.Image.status == "done", m.Listing.status != "deleted", ~_rejected()))
        return stmt.where(_category_clause(category)) if category is not None else stmt

    # Each term's tag names, matched here once against the distinct names, so that the SQL
    # below is equality on the indexed name column (no pattern matching over every row).
    known = tag_names(session)
    names = {i: [n for n in known if name_matches(n, t.variants())] for i, t in enumerate(terms)}
    per_term = [scoped(select(m.Tag.listing_id.label("listing_id"), literal(i).label("term"),
                              func.max(m.Tag.score).label("best"))
                       .where(m.Tag.name.in_(names[i]))).group_by(m.Tag.listing_id)
                for i in range(len(terms)) if names[i]]
    if not per_term:
        return TagSearch(query, described, category, [])
    matches = union_all(*per_term).subquery()
    matched, total = func.count(matches.c.term), func.sum(matches.c.best)
    ranked = session.execute(
        select(matches.c.listing_id, matched, total).group_by(matches.c.listing_id)
        .order_by(matched.desc(), total.desc(), matches.c.listing_id).limit(k)).all()
    if not ranked:
        return TagSearch(query, described, category, [])
    ids = [row[0] for row in ranked]
    wanted = sorted({n for found in names.values() for n in found})
    rows = session.execute(scoped(select(m.Tag.listing_id, m.Tag.image_id, m.Tag.name, m.Tag.source, m.Tag.score))
                           .where(m.Tag.listing_id.in_(ids), m.Tag.name.in_(wanted))).all()
    listings = {row.id: row for row in session.execute(select(m.Listing).where(m.Listing.id.in_(ids))).scalars()}
    hits = []
    for listing_id, count, score in ranked:
        listing = listings[listing_id]
        mine = [r for r in rows if r.listing_id == listing_id]
        hits.append(_explain(listing, terms, mine, int(count), float(score)))
    return TagSearch(query, described, category, hits)


def _explain(listing: m.Listing, terms: list[Term], rows: Sequence[Any], count: int, score: float) -> TagHit:
    """Why a listing matched: each term's best tag, and the photo that matched the most."""
    why: list[Reason] = []
    per_image: dict[int, tuple[int, float]] = {}
    for term in terms:
        best: dict[int, Any] = {}  # image -> best matching row for this term
        for row in rows:
            if name_matches(row.name, term.variants()) and (
                    row.image_id not in best or row.score > best[row.image_id].score):
                best[row.image_id] = row
        if not best:
            continue
        top = max(best.values(), key=lambda r: (r.score, -r.image_id))
        why.append(Reason(term.text, top.name, top.source, round(float(top.score), 4), top.image_id))
        for image_id, row in best.items():
            n, s = per_image.get(image_id, (0, 0.0))
            per_image[image_id] = (n + 1, s + float(row.score))
    image_id = max(per_image, key=lambda i: (per_image[i][0], per_image[i][1], -i))
    return TagHit(listing.external_id, listing.seller_id, listing.title, listing.category, listing.status,
                  image_id, count, round(score, 4), why)


def render(result: TagSearch) -> str:
    """The text ``catalog search`` prints."""
    terms = ", ".join(t["text"] for t in result.terms)
    head = f'search "{result.query}": terms {terms}' + (f"; category {result.category}" if result.category else "")
    if not result.hits:
        return head + "\nno listing matches"
    lines = [head]
    for rank, hit in enumerate(result.hits, 1):
        lines.append(f"{rank:>2}. {hit.listing}  seller {hit.seller_id}  {hit.matched}/{len(result.terms)} terms"
                     f"  score {hit.score:.3f}  image {hit.image_id}"
                     + (f"  [{hit.category}]" if hit.category else ""))
        lines.append("    why: " + "; ".join(
            f"{r.term} = {r.tag} ({r.source} {r.score:.2f}, image {r.image_id})" for r in hit.why))
    return "\n".join(lines)
