"""A corpus of hostile image references and files (issue 12, items 1, 5 and 14): each one
fails with its own code, and no message carries a file's contents or a URL's secrets."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import images
from tests.support.http import LocalImageServer
from worker.config import load_settings
from worker.io.errors import ImageLoadError
from worker.io.load import load_image

pytestmark = pytest.mark.timeout(30)

SECRET = "hunter2-Sekr3t"  # planted in files, URLs and the environment; never in a message
PASSWD_LINE = "root:x:0:0:root:/root:/bin/bash"


@dataclass
class World:
    tmp: Path
    allowed: Path  # the one directory CATALOG_FETCH_ALLOW_DIRS lists
    server: LocalImageServer


# Each case: a function building the reference in the world, and the code it must fail with.
CASES: dict[str, tuple[Callable[[World], str], str]] = {
    "etc-passwd": (lambda w: "/etc/passwd", "bad_reference"),
    "proc-self-environ": (lambda w: "/proc/self/environ", "bad_reference"),
    "proc-environ-file-url": (lambda w: "file:///proc/self/environ", "bad_reference"),
    "file-url-etc-passwd": (lambda w: "file:///etc/passwd", "bad_reference"),
    "file-url-localhost": (lambda w: "file://localhost/etc/passwd", "bad_reference"),
    "file-url-other-host": (lambda w: "file://fileserver/etc/passwd", "bad_reference"),
    "dot-dot-traversal": (lambda w: f"{w.allowed}/../secret.txt", "bad_reference"),
    "encoded-traversal": (lambda w: f"file://{w.allowed}/%2e%2e/secret.txt", "bad_reference"),
    "symlink-out": (lambda w: str(w.allowed / "link-out.jpg"), "bad_reference"),
    "symlink-to-environ": (lambda w: str(w.allowed / "environ.jpg"), "bad_reference"),
    "fifo": (lambda w: str(w.allowed / "pipe.jpg"), "bad_reference"),
    "directory": (lambda w: str(w.allowed), "bad_reference"),
    "dev-zero": (lambda w: "/dev/zero", "bad_reference"),
    "dev-stdin": (lambda w: "/dev/stdin", "bad_reference"),
    "sys": (lambda w: "/sys/power/state", "bad_reference"),
    "credentials-in-url": (lambda w: f"https://admin:{SECRET}@cdn.example.com/x.jpg", "bad_reference"),
    "credentials-in-ftp-url": (lambda w: f"ftp://admin:{SECRET}@files.example.com/x.jpg", "bad_reference"),
    "query-secret-blocked": (lambda w: f"http://127.0.0.1:1/x.jpg?X-Amz-Signature={SECRET}&w=1",
                             "blocked_address"),
    "query-secret-404": (lambda w: w.server.url(f"/missing.jpg?access_token={SECRET}"), "http_status"),
    "redirect-to-credentials": (lambda w: w.server.url("/to-creds"), "bad_reference"),
    "redirect-to-file": (lambda w: w.server.url("/to-file"), "bad_reference"),
    "ftp": (lambda w: "ftp://files.example.com/x.jpg", "bad_reference"),
    "gopher": (lambda w: "gopher://example.com/1", "bad_reference"),
    "data-uri": (lambda w: "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==", "bad_reference"),
    "javascript": (lambda w: "javascript:alert(1)", "bad_reference"),
    "relative": (lambda w: "photos/x.jpg", "bad_reference"),
    "relative-dot-dot": (lambda w: "../../etc/passwd", "bad_reference"),
    "scheme-relative": (lambda w: "//cdn.example.com/x.jpg", "bad_reference"),
    "nul": (lambda w: f"{w.allowed}/a.jpg\x00.png", "bad_reference"),
    "encoded-nul": (lambda w: f"file://{w.allowed}/a.jpg%00.png", "bad_reference"),
    "newline": (lambda w: "https://cdn.example.com/x.jpg\nHost: evil", "bad_reference"),
    "escape-sequence": (lambda w: "https://cdn.example.com/\x1b[2Jx.jpg", "bad_reference"),
    "text-named-jpg": (lambda w: str(w.allowed / "passwd-copy.jpg"), "not_an_image"),
    "html-over-http": (lambda w: w.server.url("/page.jpg"), "not_an_image"),
    "png-text-chunk-bomb": (lambda w: str(w.allowed / "text-bomb.png"), "decompression_bomb"),
    "png-iccp-bomb": (lambda w: str(w.allowed / "iccp-bomb.png"), "decompression_bomb"),
    "webp-bomb": (lambda w: str(w.allowed / "bomb.webp"), "too_many_pixels"),
    "webp-bomb-over-http": (lambda w: w.server.url("/bomb.webp"), "too_many_pixels"),
    "png-pixel-bomb": (lambda w: str(w.allowed / "pixels.png"), "too_many_pixels"),
}


# Local references refused for their form, before any question of where they point.
MALFORMED = {"nul", "encoded-nul", "file-url-other-host"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hostile")
    allowed = tmp / "allowed"
    images.write_photo(allowed / "a.jpg", size=(16, 16))
    secret = tmp / "secret.txt"
    secret.write_text(f"{PASSWD_LINE}\n{SECRET}\n")
    (allowed / "link-out.jpg").symlink_to(secret)
    (allowed / "environ.jpg").symlink_to("/proc/self/environ")
    os.mkfifo(allowed / "pipe.jpg")
    (allowed / "passwd-copy.jpg").write_text(f"{PASSWD_LINE}\n{SECRET}\n")
    images.write_png_text_bomb(allowed / "text-bomb.png")
    images.write_png_text_bomb(allowed / "iccp-bomb.png", kind=b"iCCP")
    images.write_webp_bomb(allowed / "bomb.webp")
    images.write_png_bomb(allowed / "pixels.png", side=30000)
    with LocalImageServer(allowed) as server:
        server.redirect("/to-creds", f"http://admin:{SECRET}@127.0.0.1:{server.port}/a.jpg")
        server.redirect("/to-file", "file:///etc/passwd")
        server.respond("/page.jpg", body=f"<html><body>{SECRET}</body></html>".encode(), content_type="text/html")
        yield World(tmp=tmp, allowed=allowed, server=server)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_reference(world: World, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTILE_TEST_SECRET", SECRET)  # would show up in /proc/self/environ
    build, code = CASES[case]
    settings = load_settings(data_dir=world.tmp / "data", fetch_allow_dirs=[str(world.allowed)],
                             fetch_allow_hosts=[world.server.allow_entry])
    ref = build(world)
    with pytest.raises(ImageLoadError) as info:
        load_image(ref, settings)
    message = f"{info.value.code}: {info.value}"
    assert info.value.code == code, message
    for leak in (SECRET, "root:x", "HOSTILE_TEST_SECRET", "\x00", "\n", "\x1b"):
        assert leak not in message, f"{leak!r} leaked into {message!r}"
    if code == "bad_reference" and ref.startswith(("/", "file:")) and case not in MALFORMED:
        # a refusal to read a local file says which setting governs it
        assert "CATALOG_FETCH_ALLOW_DIRS" in message, message
    if case.startswith("webp-bomb"):
        assert "CATALOG_MAX_PIXELS" in message and "178956970" not in message


def test_the_corpus_is_not_refused_for_want_of_an_allowed_dir(world: World) -> None:
    """The fence lets the good file through, so the refusals above are about the references."""
    settings = load_settings(data_dir=world.tmp / "data", fetch_allow_dirs=[str(world.allowed)])
    assert load_image(str(world.allowed / "a.jpg"), settings).image.size == (16, 16)
    assert load_image((world.allowed / "a.jpg").as_uri(), settings).image.size == (16, 16)


def test_docs_describe_every_image_failure_code() -> None:
    from worker.io.errors import ERROR_CODES

    text = (Path(__file__).resolve().parents[3] / "docs" / "events.md").read_text()
    table = text[text.index("### Image failure codes"):]
    for code in ERROR_CODES:
        assert f"| `{code}` |" in table, code
    assert "CATALOG_FETCH_ALLOW_DIRS" in table
