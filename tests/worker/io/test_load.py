"""worker.io (fetch, decode, load): reference handling, SSRF vetting, bounded downloads and safe decoding."""

from __future__ import annotations

import ipaddress
import pickle
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import images
from tests.support.http import LocalImageServer, make_certificates, server_ssl_context
from worker.config import load_settings
from worker.io import addresses
from worker.io import fetch as imageio
from worker.io.decode import decode_image
from worker.io.errors import ImageLoadError
from worker.io.fetch import fetch_bytes
from worker.io.load import LoadedImage, load_image

pytestmark = pytest.mark.timeout(30)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "files"
    images.write_photo(root / "photo.jpg", size=(320, 240))
    images.write_photo(root / "photo.png", size=(64, 48), seed=1)
    images.write_truncated_jpeg(root / "truncated.jpg")
    images.write_not_an_image(root / "text.jpg")
    return root


@pytest.fixture
def server(files: Path):
    with LocalImageServer(files) as srv:
        yield srv


def make_settings(tmp_path: Path, **overrides):
    values = {
        "data_dir": tmp_path / "data",
        "fetch_connect_timeout": 2.0,
        "fetch_read_timeout": 2.0,
        "fetch_total_timeout": 5.0,
        "fetch_allow_dirs": [str(tmp_path)],
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def allowed(tmp_path: Path, server: LocalImageServer):
    """Settings that allow exactly the local test server."""
    return make_settings(tmp_path, fetch_allow_hosts=[server.allow_entry])


def expect(code: str, func, *args) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        func(*args)
    assert info.value.code == code, str(info.value)
    assert str(info.value)
    return info.value


# --- files and references ---------------------------------------------------------------


def test_absolute_path_and_file_url(tmp_path: Path, files: Path) -> None:
    settings = make_settings(tmp_path)
    by_path = load_image(str(files / "photo.jpg"), settings)
    by_url = load_image((files / "photo.jpg").as_uri(), settings)
    raw = (files / "photo.jpg").read_bytes()
    for loaded in (by_path, by_url):
        assert isinstance(loaded, LoadedImage)
        assert loaded.format == "JPEG"
        assert loaded.image.mode == "RGB"
        assert (loaded.width, loaded.height) == loaded.image.size == (320, 240)
        assert loaded.raw == raw
        assert loaded.size_bytes == len(raw)
        assert loaded.sha256 == __import__("hashlib").sha256(raw).hexdigest()
    # non-trivial content (a real photo, not a flat colour)
    assert np.asarray(by_path.image).std() > 10


def test_file_url_with_escaped_characters(tmp_path: Path) -> None:
    path = images.write_photo(tmp_path / "dir with space" / "ph%oto.png", size=(16, 8))
    loaded = load_image(path.as_uri(), make_settings(tmp_path))
    assert loaded.format == "PNG" and loaded.image.size == (16, 8)


@pytest.mark.parametrize(
    "ref",
    ["", "   ", "photo.jpg", "./photo.jpg", "ftp://example.com/a.jpg", "data:image/png;base64,iVBORw0KGgo=",
     "file://otherhost/etc/passwd", "gopher://x/", "http:///nohost.jpg", "http://user:pw@example.com/a.jpg",
     "/tmp/a\x00b.jpg"],
)
def test_bad_reference(tmp_path: Path, ref: str) -> None:
    expect("bad_reference", fetch_bytes, ref, make_settings(tmp_path))


def test_directory_is_bad_reference(tmp_path: Path) -> None:
    err = expect("bad_reference", fetch_bytes, str(tmp_path), make_settings(tmp_path))
    assert "directory" in str(err)


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    err = expect("not_found", load_image, str(tmp_path / "nope.jpg"), settings)
    assert "nope.jpg" in str(err)
    expect("not_found", load_image, (tmp_path / "nope.jpg").as_uri(), settings)


def test_file_too_large(tmp_path: Path, files: Path) -> None:
    size = (files / "photo.jpg").stat().st_size
    settings = make_settings(tmp_path, fetch_max_bytes=size - 1)
    err = expect("too_large", load_image, str(files / "photo.jpg"), settings)
    assert "CATALOG_FETCH_MAX_BYTES" in str(err)
    # exactly at the limit is fine
    assert load_image(str(files / "photo.jpg"), make_settings(tmp_path, fetch_max_bytes=size)).size_bytes == size


# --- decoding -----------------------------------------------------------------------------


def test_text_named_jpg_is_not_an_image(tmp_path: Path, files: Path) -> None:
    err = expect("not_an_image", load_image, str(files / "text.jpg"), make_settings(tmp_path))
    assert "text.jpg" in str(err) and "text" in str(err)


def test_empty_and_random_bytes_are_not_images(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    expect("not_an_image", decode_image, b"", settings)
    expect("not_an_image", decode_image, bytes(range(7, 255)) * 4, settings)


def test_truncated_jpeg(tmp_path: Path, files: Path) -> None:
    err = expect("truncated", load_image, str(files / "truncated.jpg"), make_settings(tmp_path))
    assert "truncat" in str(err)


def test_truncated_png_and_corrupt_header(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    data = images.write_photo(tmp_path / "p.png", size=(64, 64)).read_bytes()
    expect("truncated", decode_image, data[: len(data) // 2], settings)
    expect("truncated", decode_image, data[:20], settings)  # signature only, IHDR cut


def test_png_bomb_is_rejected_from_the_header(tmp_path: Path) -> None:
    path = images.write_png_bomb(tmp_path / "bomb.png", side=30000)
    assert path.stat().st_size < 1_000_000
    started = time.monotonic()
    err = expect("too_many_pixels", load_image, str(path), make_settings(tmp_path))
    assert time.monotonic() - started < 2
    assert "30000x30000 = 900.0 MP" in str(err)
    assert "50.0 MP limit (CATALOG_MAX_PIXELS)" in str(err)


def test_max_pixels_is_per_call_and_pillow_global_untouched(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    path = images.write_photo(tmp_path / "p.png", size=(100, 100))
    expect("too_many_pixels", load_image, str(path), make_settings(tmp_path, max_pixels=9_999))
    assert load_image(str(path), make_settings(tmp_path, max_pixels=10_000)).width == 100
    # a bomb between our limit and Pillow's own warning threshold is still an error
    bomb = images.write_png_bomb(tmp_path / "mid.png", side=10000)  # 100 MP > Pillow's 89 MP warning
    expect("too_many_pixels", load_image, str(bomb), make_settings(tmp_path))
    assert before == Image.MAX_IMAGE_PIXELS


def test_unsupported_formats(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ico = tmp_path / "x.ico"
    images.photo((32, 32)).save(ico, "ICO")
    err = expect("unsupported_format", decode_image, ico.read_bytes(), settings)
    assert "ICO" in str(err)
    ppm = tmp_path / "x.ppm"
    images.photo((8, 8)).save(ppm, "PPM")
    expect("unsupported_format", decode_image, ppm.read_bytes(), settings)
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    expect("unsupported_format", decode_image, svg, settings)
    expect("unsupported_format", decode_image, b"\x00\x00\x00\x1cftypavif" + bytes(40), settings)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "gif", "bmp", "tiff"])
def test_supported_formats_sniffed_not_by_extension(tmp_path: Path, ext: str) -> None:
    path = images.write_photo(tmp_path / f"p.{ext}", size=(40, 30))
    misleading = tmp_path / "image.dat.jpg"
    misleading.write_bytes(path.read_bytes())
    loaded = load_image(str(misleading), make_settings(tmp_path))
    assert loaded.format == {"jpg": "JPEG", "tiff": "TIFF"}.get(ext, ext.upper())
    assert loaded.image.mode == "RGB" and loaded.image.size == (40, 30)


def test_cmyk_jpeg_to_rgb(tmp_path: Path) -> None:
    path = images.write_cmyk_jpeg(tmp_path / "cmyk.jpg")
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    loaded = load_image(str(path), make_settings(tmp_path))
    assert loaded.image.mode == "RGB" and loaded.image.size == (64, 48)
    reference = np.asarray(images.photo((64, 48), 2), dtype=np.int16)
    assert np.abs(np.asarray(loaded.image, dtype=np.int16) - reference).mean() < 12  # colours survive


def test_palette_png_with_transparency_on_white(tmp_path: Path) -> None:
    path = images.write_palette_png(tmp_path / "pal.png")
    image = load_image(str(path), make_settings(tmp_path)).image
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white, not black
    assert image.getpixel((63, 47)) == (255, 0, 0)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    path = images.write_rgba_png(tmp_path / "rgba.png")
    image = load_image(str(path), make_settings(tmp_path)).image
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((63, 0)) == (0, 0, 255)


def test_la_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    image = Image.new("LA", (4, 4), (0, 0))
    image.putpixel((3, 3), (10, 255))
    image.save(path)
    out = load_image(str(path), make_settings(tmp_path)).image
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 3)) == (10, 10, 10)


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = images.write_16bit_png(tmp_path / "16.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    image = load_image(str(path), make_settings(tmp_path)).image
    row = np.asarray(image)[0, :, 0].astype(int)
    assert image.mode == "RGB"
    assert row[0] == 0 and row[-1] == 255
    assert abs(row[128] - 128) <= 1  # mid grey stays mid grey (clipping would give 255)
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200


def test_32bit_int_and_1bit_and_greyscale(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ramp = np.tile(np.arange(0, 65536, 256, dtype=np.int32), (2, 1))  # 0..65280 in mode I
    tiff = tmp_path / "i32.tiff"
    Image.fromarray(ramp, "I").save(tiff)
    row = np.asarray(load_image(str(tiff), settings).image)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] >= 253 and abs(row[128] - 128) <= 1
    one = tmp_path / "one.png"
    Image.new("1", (8, 8), 1).save(one)
    assert load_image(str(one), settings).image.getpixel((0, 0)) == (255, 255, 255)
    grey = tmp_path / "grey.bmp"
    Image.new("L", (8, 8), 77).save(grey)
    assert load_image(str(grey), settings).image.getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_swaps_dimensions(tmp_path: Path) -> None:
    path = images.write_exif_rotated_jpeg(tmp_path / "rot.jpg", size=(80, 40), orientation=6)
    with Image.open(path) as raw:
        assert raw.size == (80, 40)
    loaded = load_image(str(path), make_settings(tmp_path))
    assert (loaded.width, loaded.height) == (40, 80) == loaded.image.size


def test_animated_gif_and_webp_first_frame(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    gif = load_image(str(images.write_animated_gif(tmp_path / "a.gif")), settings)
    assert gif.format == "GIF" and gif.image.mode == "RGB" and gif.image.size == (32, 24)
    assert gif.image.getpixel((5, 5)) == (255, 0, 0)
    webp = load_image(str(images.write_animated_webp(tmp_path / "a.webp")), settings)
    assert webp.format == "WEBP" and webp.image.getpixel((5, 5)) == (255, 0, 0)


def test_decode_image_returns_image_and_format(tmp_path: Path) -> None:
    data = images.write_photo(tmp_path / "p.png", size=(10, 12)).read_bytes()
    image, fmt = decode_image(data, make_settings(tmp_path))
    assert fmt == "PNG" and image.mode == "RGB" and image.size == (10, 12)


def test_error_pickles_with_code() -> None:
    err = ImageLoadError("http_status", "GET x returned HTTP 404", status=404)
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, str(back), back.status, back.transient) == ("http_status", "GET x returned HTTP 404", 404, False)
    assert pickle.loads(pickle.dumps(ImageLoadError("http_status", "x", status=503))).transient


def test_transient_flag() -> None:
    assert ImageLoadError("timeout", "x").transient and ImageLoadError("unreachable", "x").transient
    assert ImageLoadError("http_status", "x", status=429).transient
    assert not ImageLoadError("http_status", "x", status=404).transient
    assert not ImageLoadError("blocked_address", "x").transient
    assert not ImageLoadError("truncated", "x").transient


# --- HTTP ---------------------------------------------------------------------------------


def test_http_fetch(server: LocalImageServer, allowed, files: Path) -> None:
    loaded = load_image(server.url("/photo.jpg"), allowed)
    assert loaded.format == "JPEG" and loaded.raw == (files / "photo.jpg").read_bytes()
    path, headers = server.requests[-1]
    assert path == "/photo.jpg"
    assert headers["Host"] == f"127.0.0.1:{server.port}"


def test_http_text_and_truncated(server: LocalImageServer, allowed) -> None:
    expect("not_an_image", load_image, server.url("/text.jpg"), allowed)
    expect("truncated", load_image, server.url("/truncated.jpg"), allowed)


def test_loopback_blocked_without_allow_list(tmp_path: Path, server: LocalImageServer) -> None:
    err = expect("blocked_address", fetch_bytes, server.url("/photo.jpg"), make_settings(tmp_path))
    text = str(err)
    assert f"refused to fetch http://127.0.0.1:{server.port}/photo.jpg" in text
    assert "127.0.0.1 is a loopback address" in text and "CATALOG_FETCH_ALLOW_HOSTS" in text
    assert server.requests == []  # nothing was sent


def test_ipv6_loopback_server(tmp_path: Path, files: Path) -> None:
    try:
        server6 = LocalImageServer(files, host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    with server6:
        url = server6.url("/photo.png")
        assert url.startswith("http://[::1]:")
        expect("blocked_address", fetch_bytes, url, make_settings(tmp_path))
        allowed6 = make_settings(tmp_path, fetch_allow_hosts=[server6.allow_entry])
        assert load_image(url, allowed6).format == "PNG"
        assert server6.requests[-1][1]["Host"] == f"[::1]:{server6.port}"


def test_allow_entry_port_must_match(tmp_path: Path, server: LocalImageServer) -> None:
    other_port = make_settings(tmp_path, fetch_allow_hosts=[f"127.0.0.1:{server.port + 1}"])
    expect("blocked_address", fetch_bytes, server.url("/photo.jpg"), other_port)
    cidr = make_settings(tmp_path, fetch_allow_hosts=["127.0.0.0/8"])
    assert fetch_bytes(server.url("/photo.jpg"), cidr)


def test_http_status(server: LocalImageServer, allowed) -> None:
    err = expect("http_status", fetch_bytes, server.url("/missing.jpg"), allowed)
    assert err.status == 404 and "404" in str(err)
    server.respond("/boom", 503, b"down", "text/plain")
    boom = expect("http_status", fetch_bytes, server.url("/boom"), allowed)
    assert boom.status == 503 and boom.transient and not err.transient


def test_download_cut_short_is_truncated(server: LocalImageServer, allowed) -> None:
    def cut(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "5000")
        handler.end_headers()
        handler.wfile.write(b"\xff\xd8\xff" + bytes(100))

    server.route("/cut.jpg", cut)
    err = expect("truncated", fetch_bytes, server.url("/cut.jpg"), allowed)
    assert err.transient and "ended early" in str(err)


def test_redirects_followed(server: LocalImageServer, allowed, files: Path) -> None:
    server.redirect("/a", server.url("/b"), status=301)
    server.redirect("/b", "/photo.jpg", status=307)  # relative Location
    assert fetch_bytes(server.url("/a"), allowed) == (files / "photo.jpg").read_bytes()


def test_redirect_to_blocked_address(server: LocalImageServer, allowed) -> None:
    server.redirect("/meta", "http://169.254.169.254/latest/meta-data/")
    err = expect("blocked_address", fetch_bytes, server.url("/meta"), allowed)
    assert "169.254.169.254" in str(err) and "link-local" in str(err)
    assert f"redirected from {server.url('/meta')}" in str(err)
    # another port on the allowed host is not allowed either
    server.redirect("/port", f"http://127.0.0.1:{server.port + 1}/x")
    expect("blocked_address", fetch_bytes, server.url("/port"), allowed)


def test_redirect_to_file_scheme_refused(server: LocalImageServer, allowed) -> None:
    server.redirect("/file", "file:///etc/passwd")
    err = expect("bad_reference", fetch_bytes, server.url("/file"), allowed)
    assert "file" in str(err)


def test_redirect_loop_and_limit(tmp_path: Path, server: LocalImageServer) -> None:
    server.redirect("/loop1", "/loop2")
    server.redirect("/loop2", "/loop1")
    settings = make_settings(tmp_path, fetch_allow_hosts=[server.allow_entry], fetch_max_redirects=3)
    err = expect("too_many_redirects", fetch_bytes, server.url("/loop1"), settings)
    assert "CATALOG_FETCH_MAX_REDIRECTS" in str(err)
    assert server.hits("/loop1") + server.hits("/loop2") == 4  # the original + 3 followed
    server.redirect("/once", "/photo.jpg")
    no_redirects = make_settings(tmp_path, fetch_allow_hosts=[server.allow_entry], fetch_max_redirects=0)
    expect("too_many_redirects", fetch_bytes, server.url("/once"), no_redirects)


def test_http_too_large_by_content_length(server: LocalImageServer, allowed) -> None:
    server.huge_content_length("/huge")
    err = expect("too_large", fetch_bytes, server.url("/huge"), allowed)
    assert "Content-Length" in str(err)


def test_http_too_large_while_streaming(tmp_path: Path, server: LocalImageServer) -> None:
    server.endless("/endless")
    settings = make_settings(tmp_path, fetch_allow_hosts=[server.allow_entry], fetch_max_bytes=1_000_000)
    started = time.monotonic()
    err = expect("too_large", fetch_bytes, server.url("/endless"), settings)
    assert time.monotonic() - started < 3
    assert "stopped reading" in str(err)


def test_http_too_large_photo(tmp_path: Path, server: LocalImageServer, files: Path) -> None:
    size = (files / "photo.jpg").stat().st_size
    settings = make_settings(tmp_path, fetch_allow_hosts=[server.allow_entry], fetch_max_bytes=size - 1)
    expect("too_large", load_image, server.url("/photo.jpg"), settings)


def test_read_timeout(tmp_path: Path, server: LocalImageServer) -> None:
    stall = server.stall("/stall", seconds=10, body=b"late")
    settings = make_settings(tmp_path, fetch_allow_hosts=[server.allow_entry], fetch_read_timeout=0.3)
    started = time.monotonic()
    err = expect("timeout", fetch_bytes, server.url("/stall"), settings)
    assert time.monotonic() - started < 3
    assert stall.arrived.is_set() and stall.hits == 1
    assert "CATALOG_FETCH_READ_TIMEOUT" in str(err)


def test_stall_release_lets_download_finish(tmp_path: Path, server: LocalImageServer, files: Path) -> None:
    body = (files / "photo.jpg").read_bytes()
    stall = server.stall("/held.jpg", seconds=10, body=body, before_headers=False)
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("image", load_image(server.url("/held.jpg"), make_settings(
            tmp_path, fetch_allow_hosts=[server.allow_entry], fetch_read_timeout=5.0))),
    )
    thread.start()
    assert stall.arrived.wait(5)
    stall.release()
    thread.join(5)
    assert getattr(result["image"], "raw", None) == body


def test_total_deadline_against_slow_drip(tmp_path: Path, server: LocalImageServer) -> None:
    server.drip("/drip", b"\xff" * 1000, interval=0.05)
    settings = make_settings(
        tmp_path, fetch_allow_hosts=[server.allow_entry], fetch_read_timeout=1.0, fetch_total_timeout=0.6
    )
    started = time.monotonic()
    err = expect("timeout", fetch_bytes, server.url("/drip"), settings)
    assert time.monotonic() - started < 3  # ~0.6 s; the per-read timeout (1 s x many) never fires
    assert "CATALOG_FETCH_TOTAL_TIMEOUT" in str(err)


def test_connection_refused_is_unreachable(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    settings = make_settings(tmp_path, fetch_allow_hosts=["127.0.0.1"])
    err = expect("unreachable", fetch_bytes, f"http://127.0.0.1:{port}/x.jpg", settings)
    assert str(port) in str(err)


def test_dns_failure_is_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(imageio, "_resolve", fail)
    err = expect("unreachable", fetch_bytes, "http://no-such-host.invalid/x.jpg", make_settings(tmp_path))
    assert "no-such-host.invalid" in str(err)


def test_hostname_any_private_address_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imageio, "_resolve", lambda host, port: ["93.184.216.34", "10.1.2.3"])
    err = expect("blocked_address", fetch_bytes, "http://cdn.example.com/a.jpg", make_settings(tmp_path))
    assert "cdn.example.com resolves to 10.1.2.3" in str(err) and "private" in str(err)


def test_connects_to_vetted_ip_with_original_host_header(
    tmp_path: Path, server: LocalImageServer, monkeypatch: pytest.MonkeyPatch, files: Path
) -> None:
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(imageio, "_resolve", resolve)
    # if anything resolved the name again (urllib3, a rebinding DNS), the real resolver would fail
    real = socket.getaddrinfo

    def no_name_lookups(host, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise AssertionError(f"unexpected DNS lookup of {host}") from None
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_name_lookups)
    settings = make_settings(tmp_path, fetch_allow_hosts=[server.allow_entry])
    data = fetch_bytes(f"http://images.test:{server.port}/photo.jpg?v=2", settings)
    assert data == (files / "photo.jpg").read_bytes()
    assert calls == ["images.test"]
    assert server.requests[-1][1]["Host"] == f"images.test:{server.port}"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_to_vetted_ip_with_sni_and_certificate_check(
    tmp_path: Path, files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls", ["images.test"])
    context = server_ssl_context(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # urllib3's default trust store picks it up
    monkeypatch.setattr(imageio, "_resolve", lambda host, port: ["127.0.0.1"])
    with LocalImageServer(files, ssl_context=context) as tls:
        settings = make_settings(tmp_path, fetch_allow_hosts=[tls.allow_entry])
        data = fetch_bytes(f"https://images.test:{tls.port}/photo.jpg", settings)
        assert data == (files / "photo.jpg").read_bytes()
        assert getattr(context, "seen_sni", None) == ["images.test"]  # SNI names the host, not the IP
        assert tls.requests[-1][1]["Host"] == f"images.test:{tls.port}"
        # the certificate is checked against the URL's host name
        err = expect("unreachable", fetch_bytes, f"https://other.test:{tls.port}/photo.jpg", settings)
        assert "TLS" in str(err) and "other.test" in str(err)


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("240.0.0.1", "reserved"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "IPv4-mapped"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a00:1", "NAT64"),
        ("2002:7f00:1::", "6to4"),
        ("192.0.2.10", ""),
    ],
)
def test_blocked_address_classes(address: str, words: str) -> None:
    reason = addresses.blocked_reason(ipaddress.ip_address(address))
    assert reason is not None, address
    assert words in reason


@pytest.mark.parametrize("address",
                         ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "100.128.0.1"])
def test_public_addresses_pass(address: str) -> None:
    assert addresses.blocked_reason(ipaddress.ip_address(address)) is None


def test_blocked_literal_addresses_via_fetch(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    for url in ["http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/x", "http://100.64.1.1/x",
                "http://0.0.0.0:80/", "https://[::1]/x", "http://10.0.0.1/x"]:
        expect("blocked_address", fetch_bytes, url, settings)


def test_allow_list_matches_mapped_and_cidr(tmp_path: Path) -> None:
    entries = [addresses.parse_allow_entry(e) for e in ["10.0.0.0/8", "127.0.0.1:8080", "[::1]:9000"]]
    assert addresses.is_allowed(ipaddress.ip_address("10.2.3.4"), 80, entries)
    assert addresses.is_allowed(ipaddress.ip_address("::ffff:10.2.3.4"), 80, entries)
    assert addresses.is_allowed(ipaddress.ip_address("127.0.0.1"), 8080, entries)
    assert not addresses.is_allowed(ipaddress.ip_address("127.0.0.1"), 8081, entries)
    assert addresses.is_allowed(ipaddress.ip_address("::1"), 9000, entries)
    assert not addresses.is_allowed(ipaddress.ip_address("192.168.0.1"), 80, entries)


def test_concurrent_loads_are_independent(tmp_path: Path, files: Path) -> None:
    big = images.write_photo(tmp_path / "big.png", size=(200, 200))
    strict = make_settings(tmp_path, max_pixels=10_000)
    loose = make_settings(tmp_path)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            if i % 2:
                assert load_image(str(big), loose).width == 200
            else:
                expect("too_many_pixels", load_image, str(big), strict)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
