"""worker.io.local: local image files are read only under CATALOG_FETCH_ALLOW_DIRS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import images
from worker.config import ConfigError, load_settings
from worker.io.errors import ImageLoadError
from worker.io.fetch import fetch_bytes
from worker.io.load import load_image

pytestmark = pytest.mark.timeout(30)


def settings_for(tmp_path: Path, *allowed: Path | str):
    return load_settings(data_dir=tmp_path / "data", fetch_allow_dirs=[str(a) for a in allowed])


def refused(ref: str, settings) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        fetch_bytes(ref, settings)
    assert info.value.code == "bad_reference", str(info.value)
    return info.value


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    images.write_photo(root / "a.jpg", size=(40, 30))
    return root


def test_files_are_off_by_default(tmp_path: Path, photos: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    assert settings.fetch_allow_dirs == []
    for ref in (str(photos / "a.jpg"), (photos / "a.jpg").as_uri()):
        err = refused(ref, settings)
        assert "CATALOG_FETCH_ALLOW_DIRS" in str(err)


def test_files_under_an_allowed_dir_are_read(tmp_path: Path, photos: Path) -> None:
    settings = settings_for(tmp_path, photos)
    assert load_image(str(photos / "a.jpg"), settings).image.size == (40, 30)
    assert load_image((photos / "a.jpg").as_uri(), settings).image.size == (40, 30)
    images.write_photo(photos / "deeper" / "b.png", size=(8, 6))
    assert load_image(str(photos / "deeper" / "b.png"), settings).width == 8


def test_file_outside_the_allowed_dirs_is_refused_without_saying_whether_it_exists(tmp_path: Path,
                                                                                   photos: Path) -> None:
    other = images.write_photo(tmp_path / "other" / "c.jpg", size=(8, 8))
    settings = settings_for(tmp_path, photos)
    exists = refused(str(other), settings)
    missing = refused(str(tmp_path / "other" / "nope.jpg"), settings)
    assert "outside the directories listed in CATALOG_FETCH_ALLOW_DIRS" in str(exists)
    assert str(exists).replace("c.jpg", "X") == str(missing).replace("nope.jpg", "X")


def test_a_sibling_dir_sharing_the_prefix_is_outside(tmp_path: Path, photos: Path) -> None:
    sneaky = images.write_photo(tmp_path / "photos-private" / "x.jpg", size=(8, 8))
    refused(str(sneaky), settings_for(tmp_path, photos))


@pytest.mark.parametrize("how", ["path", "url", "encoded-url"])
def test_dot_dot_cannot_escape(tmp_path: Path, photos: Path, how: str) -> None:
    images.write_photo(tmp_path / "secret.jpg", size=(8, 8))
    settings = settings_for(tmp_path, photos)
    if how == "path":
        ref = f"{photos}/../secret.jpg"
    elif how == "url":
        ref = f"file://{photos}/../secret.jpg"
    else:
        ref = f"file://{photos}/%2e%2e/secret.jpg"
    refused(ref, settings)


def test_symlink_out_of_an_allowed_dir_is_refused(tmp_path: Path, photos: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (photos / "innocent.jpg").symlink_to(secret)
    (photos / "passwd.jpg").symlink_to("/etc/passwd")
    settings = settings_for(tmp_path, photos)
    for name in ("innocent.jpg", "passwd.jpg"):
        err = refused(str(photos / name), settings)
        assert "resolves to a file outside" in str(err) and "root:" not in str(err)


def test_symlinked_dir_out_of_an_allowed_dir_is_refused(tmp_path: Path, photos: Path) -> None:
    images.write_photo(tmp_path / "elsewhere" / "z.jpg", size=(8, 8))
    (photos / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    refused(str(photos / "link" / "z.jpg"), settings_for(tmp_path, photos))


def test_symlink_inside_the_allowed_dir_is_followed(tmp_path: Path, photos: Path) -> None:
    (photos / "alias.jpg").symlink_to(photos / "a.jpg")
    assert load_image(str(photos / "alias.jpg"), settings_for(tmp_path, photos)).width == 40


def test_allowed_dir_given_through_a_symlink(tmp_path: Path, photos: Path) -> None:
    link = tmp_path / "photos-link"
    link.symlink_to(photos, target_is_directory=True)
    settings = settings_for(tmp_path, link)
    assert settings.fetch_allow_dirs == [str(photos.resolve())]  # resolved at start-up
    assert load_image(str(link / "a.jpg"), settings).width == 40


def test_fifo_and_directory_are_refused_even_when_allowed(tmp_path: Path, photos: Path) -> None:
    fifo = photos / "pipe.jpg"
    os.mkfifo(fifo)
    settings = settings_for(tmp_path, photos)
    assert "a FIFO" in str(refused(str(fifo), settings))  # and it did not hang opening it
    assert "a directory" in str(refused(str(photos), settings))
    (photos / "sub.jpg").mkdir()
    assert "a directory" in str(refused(str(photos / "sub.jpg"), settings))


@pytest.mark.parametrize("ref", ["/proc/self/environ", "/proc/self/cmdline", "/sys/power/state", "/dev/zero",
                                 "/dev/urandom", "/dev/stdin", "file:///proc/self/environ",
                                 "//proc/self/environ", "/proc/../proc/self/environ"])
def test_system_paths_are_never_read_even_when_everything_is_allowed(tmp_path: Path, ref: str) -> None:
    err = refused(ref, settings_for(tmp_path, "/"))
    assert "/proc, /sys and /dev are never read" in str(err) and "CATALOG_FETCH_ALLOW_DIRS" in str(err)


def test_symlink_to_proc_is_refused_even_when_everything_is_allowed(tmp_path: Path, photos: Path) -> None:
    (photos / "env.jpg").symlink_to("/proc/self/environ")
    err = refused(str(photos / "env.jpg"), settings_for(tmp_path, "/"))
    assert "never read" in str(err)


def test_an_allowed_file_entry_allows_that_file_only(tmp_path: Path, photos: Path) -> None:
    """`catalog process a.jpg` allows that file (settings built by hand: model_copy)."""
    images.write_photo(photos / "b.jpg", size=(8, 8))
    settings = load_settings(data_dir=tmp_path / "data").model_copy(
        update={"fetch_allow_dirs": [str(photos / "a.jpg")]}
    )
    assert load_image(str(photos / "a.jpg"), settings).width == 40
    refused(str(photos / "b.jpg"), settings)


def test_missing_file_inside_the_allowed_dir_is_not_found(tmp_path: Path, photos: Path) -> None:
    with pytest.raises(ImageLoadError) as info:
        fetch_bytes(str(photos / "nope.jpg"), settings_for(tmp_path, photos))
    assert info.value.code == "not_found" and "nope.jpg" in str(info.value)


def test_setting_must_name_existing_directories(tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_FETCH_ALLOW_DIRS", f"{photos}, {tmp_path / 'missing'}")
    with pytest.raises(ConfigError) as info:
        load_settings(data_dir=tmp_path / "data")
    assert "CATALOG_FETCH_ALLOW_DIRS" in str(info.value) and "missing' is not an existing directory" in str(info.value)
    monkeypatch.setenv("CATALOG_FETCH_ALLOW_DIRS", str(photos / "a.jpg"))  # a file is not a directory
    with pytest.raises(ConfigError):
        load_settings(data_dir=tmp_path / "data")
    monkeypatch.setenv("CATALOG_FETCH_ALLOW_DIRS", f"{photos},{tmp_path}")
    assert load_settings(data_dir=tmp_path / "data").fetch_allow_dirs == [str(photos), str(tmp_path)]
