from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from worker.intake.events import (
    MAX_EVENT_BYTES,
    MAX_EVENT_DEPTH,
    MAX_IMAGE_REF_LENGTH,
    MAX_IMAGES_PER_LISTING,
    InvalidEvent,
    json_schema,
    parse_event,
)
from worker.io.errors import ImageLoadError
from worker.io.load import load_image

GOOD = {
    "event_id": "e1",
    "type": "listing.created",
    "occurred_at": "2026-11-29T12:00:00Z",
    "listing": {"id": "L1", "seller_id": "S1", "title": "cup", "category": None,
                "images": ["https://cdn.example.com/a.jpg", "file:///tmp/b.png", "/srv/c.jpg"]},
}

# References the worker cannot fetch: each must fail its own image, not the listing.
UNSUPPORTED_REFS = ["ftp://x/y.jpg", "gopher://x/1", "data:image/png;base64,iVBORw0KGgo=",
                    "relative/path.jpg", "cdn.example.com/a.jpg", "mailto:a@b.c"]


def good() -> dict:
    return json.loads(json.dumps(GOOD))


def nested(depth: int) -> object:
    """``depth`` levels of arrays/objects, alternating, the innermost holding a scalar."""
    value: object = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_valid_event_parses() -> None:
    ev = parse_event(json.dumps(GOOD))
    assert ev.type == "listing.created" and ev.listing.images[2] == "/srv/c.jpg"
    assert ev.occurred_at.tzinfo is not None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda e: e.update(type="listing.sold"), "type"),
        (lambda e: e.pop("event_id"), "event_id"),
        (lambda e: e.update(occurred_at="2026-11-29T12:00:00"), "timezone"),
        (lambda e: e.update(occurred_at="yesterday"), "occurred_at"),
        (lambda e: e["listing"].update(images=["/a.jpg"] * 51), "images"),
        (lambda e: e["listing"].pop("seller_id"), "seller_id"),
        (lambda e: e["listing"].update(images=["https://a/b.jpg", ""]), r"listing\.images\.1"),
        (lambda e: e["listing"].update(images=["   "]), r"listing\.images\.0"),
        (lambda e: e["listing"].update(images=["https://a/" + "x" * MAX_IMAGE_REF_LENGTH]), r"listing\.images\.0"),
        (lambda e: e["listing"].update(images=["https://a/b.jpg", 7]), r"listing\.images\.1: .*string"),
        (lambda e: e["listing"].update(images="https://a/b.jpg"), r"listing\.images: .*list"),
        (lambda e: e.update(listing=[]), "listing"),
        (lambda e: e.update(event_id=123), "event_id"),
        (lambda e: e["listing"].update(title=None), r"listing\.title"),
    ],
)
def test_invalid_events_have_readable_reasons(mutate, reason: str) -> None:
    data = good()
    mutate(data)
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(json.dumps(data))


@pytest.mark.parametrize(("raw", "code"), [("{not json", "not_json"), ("[1, 2]", "not_an_object"),
                                           ('"just a string"', "not_an_object"), ("", "not_json"),
                                           (b"\xff\xfe", "not_json"), (b"\x00\x01binary", "not_json")])
def test_garbage_is_invalid(raw, code: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    assert info.value.code == code


# --- item 3: size and nesting-depth limits ----------------------------------------------

def test_deeply_nested_json_is_rejected_as_invalid_not_a_recursion_error() -> None:
    # Deep enough to overflow the JSON parser's recursion without the depth check.
    raw = '{"event_id": "e", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(InvalidEvent, match="nested too deeply") as info:
        parse_event(raw)
    assert info.value.code == "too_deep"
    with pytest.raises(InvalidEvent, match="nested too deeply"):
        parse_event(raw.encode())


@pytest.mark.parametrize("as_text", [True, False])
def test_nesting_depth_limit_is_exact(as_text: bool) -> None:
    # The event object is level 1, so an extra field may nest MAX_EVENT_DEPTH - 1 levels.
    at_limit, over = good(), good()
    at_limit["extra"] = nested(MAX_EVENT_DEPTH - 1)
    over["extra"] = nested(MAX_EVENT_DEPTH)
    encode = json.dumps if as_text else (lambda value: value)
    assert parse_event(encode(at_limit)).event_id == "e1"
    with pytest.raises(InvalidEvent, match="nested too deeply"):
        parse_event(encode(over))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    data = good()
    data["listing"]["title"] = "[{" * 1000
    assert parse_event(json.dumps(data)).listing.title == "[{" * 1000


def test_depth_scan_is_linear_on_an_unterminated_escaped_string() -> None:
    # A naive string regex re-scans from every quote: quadratic on this input.
    raw = '"' + '\\"' * 300_000 + "[{" * 40
    started = time.perf_counter()
    with pytest.raises(InvalidEvent, match="not JSON"):
        parse_event(raw)
    assert time.perf_counter() - started < 2.0


def test_oversized_events_are_rejected_before_parsing() -> None:
    data = good()
    data["padding"] = "x" * MAX_EVENT_BYTES
    for payload in (json.dumps(data), json.dumps(data).encode(), data):
        with pytest.raises(InvalidEvent, match="too large") as info:
            parse_event(payload)
        assert info.value.code == "too_large"


def test_an_event_using_every_field_limit_fits_the_size_limit() -> None:
    """The documented claim: any event within the field limits, written as plain UTF-8
    JSON, is below MAX_EVENT_BYTES, even with 4-byte characters everywhere."""
    wide = "\U0001F600"  # 4 bytes in UTF-8
    data = {
        "event_id": wide * 255, "type": "listing.updated", "occurred_at": "2026-11-29T12:00:00+00:00",
        "listing": {"id": wide * 255, "seller_id": wide * 255, "title": wide * 10_000,
                    "category": wide * 255,
                    "images": [f"https://cdn.example.com/{n:02d}/" + wide * (MAX_IMAGE_REF_LENGTH - 30)
                               for n in range(MAX_IMAGES_PER_LISTING)]},
    }
    raw = json.dumps(data, ensure_ascii=False).encode("utf-8")
    assert len(raw) <= MAX_EVENT_BYTES
    assert len(parse_event(raw).listing.images) == MAX_IMAGES_PER_LISTING


# --- item 4: NUL characters and other text the databases cannot store -------------------

@pytest.mark.parametrize(
    ("path", "where"),
    [(("event_id",), "event_id"), (("listing", "id"), "listing.id"),
     (("listing", "seller_id"), "listing.seller_id"), (("listing", "title"), "listing.title"),
     (("listing", "category"), "listing.category"), (("listing", "images", 1), "listing.images.1")],
)
def test_a_nul_character_in_any_string_field_is_rejected_naming_the_field(path: tuple, where: str) -> None:
    data = good()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "abc\x00def" if path[-1] != 1 else "https://cdn.example.com/a\x00.jpg"
    raw = json.dumps(data)  # the NUL travels as the JSON escape \u0000
    assert "\\u0000" in raw
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    message = str(info.value)
    assert message.startswith(f"{where}: ") and "NUL" in message
    assert "\x00" not in message


def test_an_unpaired_surrogate_is_rejected_as_text_that_cannot_be_stored() -> None:
    raw = json.dumps(good()).replace('"cup"', '"cup \\ud800"')
    with pytest.raises(InvalidEvent, match=r"listing\.title: .*unicode") as info:
        parse_event(raw)
    str(info.value).encode("utf-8")  # the reason itself can be stored


# --- item 5: unsupported image references fail per image, not per listing ---------------

def test_unsupported_image_references_are_accepted_by_validation() -> None:
    data = good()
    data["listing"]["images"] = ["https://cdn.example.com/good.jpg", *UNSUPPORTED_REFS]
    assert parse_event(json.dumps(data)).listing.images == data["listing"]["images"]


@pytest.mark.parametrize("ref", UNSUPPORTED_REFS)
def test_unsupported_image_references_fail_with_bad_reference_when_loaded(ref: str, make_settings) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(ref, make_settings())
    assert info.value.code == "bad_reference"


def test_documented_schema_matches_the_code() -> None:
    doc = Path(__file__).resolve().parents[3] / "docs" / "events.schema.json"
    assert json.loads(doc.read_text()) == json_schema(), "regenerate with `catalog events-schema`"


def test_schema_tells_producers_the_limits() -> None:
    listing = json_schema()["$defs"]["ListingPayload"]["properties"]
    refs = listing["images"]["items"]
    assert refs["minLength"] == 1 and refs["maxLength"] == MAX_IMAGE_REF_LENGTH
    assert refs["pattern"] == "^[^\\u0000]*$" and listing["title"]["pattern"] == refs["pattern"]


def test_docs_name_every_dead_letter_code_and_limit() -> None:
    from worker.intake import events

    text = (Path(__file__).resolve().parents[3] / "docs" / "events.md").read_text()
    codes = [events.NO_EVENT_FIELD, events.TOO_LARGE, events.TOO_DEEP, events.NOT_JSON, events.NOT_AN_OBJECT,
             events.INVALID, events.UNPARSEABLE]
    for code in codes:
        assert f"| `{code}` |" in text, code
    assert f"{MAX_EVENT_BYTES:,} bytes" in text and f"at most {MAX_EVENT_DEPTH}" in text
    assert f"at most {MAX_IMAGE_REF_LENGTH:,} characters" in text
    assert f"Up to {MAX_IMAGES_PER_LISTING} references" in text
