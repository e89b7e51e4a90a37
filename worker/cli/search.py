"""`catalog search` (tag search) and `catalog similar` (visual search, "more like this")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from worker.cli.common import allow_local, cli_settings, ensure_schema, setup_logging
from worker.config import Settings

QUERY_STATUSES = ("pending", "processing", "done")  # worker.search.index.QUERY_STATUSES
K_RANGE = click.IntRange(1, 100)


@click.command("search")
@click.argument("query")
@click.option("--k", type=K_RANGE, default=10, show_default=True, help="How many listings (1-100).")
@click.option("--category", default=None,
              help="Only listings declared or categorised so (English or zh-CN name, e.g. 厨具).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def search_cmd(query: str, k: int, category: str | None, as_json: bool) -> None:
    """Find listings by what their photos show: QUERY's words are matched against the stored
    tags (ImageNet labels, categories, detection labels, colours, attribute values), in English
    or zh-CN ("red cup", "红色杯子").

    \b
    Listings are ranked by how many terms they match, then by the matching tags' scores, and
    each hit says why. Deleted listings and failed photos never match.
    """
    from db.session import session_factory
    from worker.search.tags import SearchQueryError, render, search_tags

    settings = cli_settings()
    setup_logging(settings)
    ensure_schema(settings)
    try:
        with session_factory(settings.effective_database_url)() as session:
            result = search_tags(session, settings, query, k=k, category=category)
    except SearchQueryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) if as_json else render(result))


def _looks_like_photo(ref: str) -> bool:
    return ref.startswith(("http://", "https://", "file://")) or os.sep in ref or Path(ref).suffix != ""


def _photo_settings(settings: Settings, ref: str) -> Settings:
    """What the operator names on the command line may be read (as with `catalog process`)."""
    if ref.startswith(("http://", "https://")):
        return settings
    from worker.io.errors import ImageLoadError
    from worker.io.local import file_url_path

    try:
        path = file_url_path(ref) if ref.startswith("file://") else ref
    except ImageLoadError as exc:
        raise click.BadParameter(str(exc), param_hint="QUERY") from None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise click.BadParameter(f"{ref} is neither a listing, an image id nor an existing file",
                                 param_hint="QUERY")
    return allow_local(settings, [str(resolved)])


def _query_photo(settings: Settings, ref: str, kind: str) -> tuple[Any, Any, Settings]:
    """(QueryVector-like kwargs for SimilarQuery, the photo) of a FILE or URL: loaded through
    the hardened loader and embedded by the same steps as listing photos; nothing stored."""
    from worker.io.errors import ImageLoadError
    from worker.search.analyze import AnalyzeError, analyze_photo, load_reference

    settings = _photo_settings(settings, ref)
    ref = str(Path(ref).expanduser().resolve()) if not ref.startswith(("http://", "https://", "file://")) else ref
    try:
        photo = load_reference(ref, settings)
        analysis = analyze_photo(photo, settings)
        vector, version = analysis.vector(kind)
    except (ImageLoadError, AnalyzeError) as exc:
        raise click.ClickException(str(exc)) from None
    tags = tuple(dict.fromkeys([t["name"] for t in analysis.tags] + [b["label"] for b in analysis.boxes]))
    return {"vector": vector, "model_version": version, "query_tags": tags}, photo.image, settings


@click.command("similar")
@click.argument("query")
@click.option("--k", type=K_RANGE, default=10, show_default=True, help="How many listings (1-100).")
@click.option("--category", default=None, help="Only listings declared or categorised so.")
@click.option("--label", "object_label", default=None, help="Only photos with this detected object (e.g. cup).")
@click.option("--colour", "--color", "colour", default=None, help="Only photos with this colour tag (e.g. red).")
@click.option("--seller", "sellers", multiple=True, help="Only these sellers (repeatable).")
@click.option("--exclude-seller", "exclude_sellers", multiple=True, help="Leave these sellers out (repeatable).")
@click.option("--include-own-seller", is_flag=True,
              help="Also list the query listing's own seller (left out by default: recommendations "
                   "point to other shops).")
@click.option("--status", "statuses", multiple=True, type=click.Choice(QUERY_STATUSES),
              help="Only listings in these statuses (repeatable; default all but deleted).")
@click.option("--kind", type=click.Choice(["region", "full"]), default=None,
              help="Vector searched: the product region or the whole photo (default CATALOG_SEARCH_EMBEDDING).")
@click.option("--all", "show_all", is_flag=True, help="Do not fold near-identical photos into one result.")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a contact sheet PNG: the query photo and its results with scores.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def similar_cmd(query: str, k: int, category: str | None, object_label: str | None, colour: str | None,
                sellers: tuple[str, ...], exclude_sellers: tuple[str, ...], include_own_seller: bool,
                statuses: tuple[str, ...], kind: str | None, show_all: bool, sheet: Path | None,
                as_json: bool) -> None:
    """Listings that look like QUERY: a listing (the shop's id), an image id, a local photo
    file or an http(s) URL. Results are other sellers' listings, one per listing and one per
    near-identical photo, best first, with the cosine score and the tags they share.

    \b
    catalog similar demo-listing
    catalog similar 6 --include-own-seller --k 5
    catalog similar ~/photos/cup.jpg --colour red --sheet similar.png
    catalog similar image:12 / listing:12   (when an id could be either)
    """
    from db.session import session_factory
    from worker.search.errors import SearchError
    from worker.search.similar import SimilarQuery, similar, vector_for_image, vector_for_listing

    settings = cli_settings()
    setup_logging(settings)
    ensure_schema(settings)
    options: dict[str, Any] = {
        "k": k, "category": category, "object_label": object_label, "colour": colour,
        "sellers": sellers, "exclude_sellers": exclude_sellers, "include_own_seller": include_own_seller,
        "collapse": not show_all, **({"statuses": statuses} if statuses else {})}
    photo = None
    described: dict[str, Any]
    try:
        with session_factory(settings.effective_database_url)() as session:
            kind_ = kind or settings.search_embedding
            listing = _listing(session, query)
            if listing is not None:
                qv = vector_for_listing(session, settings, listing.external_id, kind_)
                described = {"listing": listing.external_id, "image_id": qv.image_id, "seller_id": qv.seller_id}
            elif query.removeprefix("image:").isdigit() and not query.startswith("listing:"):
                qv = vector_for_image(session, settings, int(query.removeprefix("image:")), kind_)
                described = {"image_id": qv.image_id, "seller_id": qv.seller_id}
            elif _looks_like_photo(query):
                qv = None
                extra, photo, settings = _query_photo(settings, query, kind_)
                options.update(extra, kind=kind_)
                described = {"photo": query}
            else:
                raise SearchError("unknown_listing", f"There is no listing {query}.")
            request = SimilarQuery.from_vector(qv, **options) if qv is not None else SimilarQuery(**options)
            results = similar(session, settings, request)
            if sheet is not None:
                _write_sheet(session, settings, sheet, query, described, photo, results)
    except SearchError as exc:
        raise click.ClickException(str(exc)) from None
    described["kind"] = kind_
    if as_json:
        click.echo(json.dumps({"query": described, "results": [r.as_dict() for r in results]},
                              indent=2, ensure_ascii=False))
    else:
        click.echo(render_similar(query, described, results, include_own_seller))
    if sheet is not None:
        click.echo(f"contact sheet: {sheet}", err=as_json)


def _listing(session: Any, query: str) -> Any:
    """The listing QUERY names: ``listing:ID`` (the shop's id or the row id), or a shop's
    listing id as is; plain digits that are no shop's id are an image id."""
    from sqlalchemy import select

    from db import models as m
    from worker.search.similar import find_listing

    if query.startswith("listing:"):
        return find_listing(session, query.removeprefix("listing:"))
    if query.startswith("image:"):
        return None
    return session.execute(select(m.Listing).where(m.Listing.external_id == query)).scalar_one_or_none()


def render_similar(query: str, described: dict[str, Any], results: list[Any], include_own_seller: bool) -> str:
    what = (f"listing {described['listing']} (image {described['image_id']})" if "listing" in described
            else f"image {described['image_id']}" if "image_id" in described else f"photo {described['photo']}")
    own = ""
    if described.get("seller_id") and not include_own_seller:
        own = f"; seller {described['seller_id']} left out"
    lines = [f"similar to {what}, {described['kind']} vectors{own}:"]
    if not results:
        lines.append("no similar listing found")
    for rank, r in enumerate(results, 1):
        lines.append(f"{rank:>2}. {r.external_id}  score {r.score:.3f}  image {r.image_id}  seller {r.seller_id}"
                     + (f"  [{r.category}]" if r.category else "") + (f"  {r.title!r}" if r.title else ""))
        extra = []
        if r.why:
            extra.append("shares: " + ", ".join(r.why[:6]))
        if r.collapsed:
            extra.append("folded in (same listing or near-identical photo): images " + ", ".join(map(str, r.collapsed)))
        if extra:
            lines.append("    " + "; ".join(extra))
    return "\n".join(lines)


def _write_sheet(session: Any, settings: Settings, path: Path, query: str, described: dict[str, Any],
                 photo: Any, results: list[Any]) -> None:
    from worker.search.sheet import Tile, render_sheet, save_sheet, stored_picture

    if photo is None and described.get("image_id") is not None:
        photo = stored_picture(session, settings, int(described["image_id"]))
    head = ["query", described.get("listing") or (f"image {described['image_id']}" if "image_id" in described
                                                  else Path(query).name)]
    if described.get("seller_id"):
        head.append(f"seller {described['seller_id']}")
    tiles = [Tile(stored_picture(session, settings, r.image_id),
                  [f"{n}. score {r.score:.3f}", r.external_id, f"seller {r.seller_id}",
                   ", ".join(r.why[:3]) if r.why else (r.category or "")])
             for n, r in enumerate(results, 1)]
    image = render_sheet(Tile(photo, head), tiles, title=f"catalog similar {query}",
                         columns=min(5, len(tiles) + 1))
    save_sheet(image, path)
