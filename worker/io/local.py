"""Read an image from a local file, only from the directories the operator allows.

An event names its images, and an event comes from outside: without a fence, a path or
``file://`` URL in it would make the worker read any file it can (``/etc/passwd``, its own
environment under ``/proc``) and store what it found in ``images.error``. So a local file is
read only when

* ``CATALOG_FETCH_ALLOW_DIRS`` lists a directory (or ``catalog process`` / ``catalog demo``
  added the file or folder they were given) that contains the file's *real* path, resolved
  after following every symlink and ``..``;
* the real path is not under ``/proc``, ``/sys`` or ``/dev`` (never, even when listed);
* it is a regular file: never a directory, FIFO, socket or device, and nothing is opened
  before that is known;
* the file actually opened is still that file (same inode; on Linux its path as the kernel
  sees it is checked again), so a symlink swapped in between cannot redirect the read.

Whether a file outside the allowed directories exists is never revealed: the refusal comes
before any look at the file itself. Messages quote the reference as given, never contents.
"""

from __future__ import annotations

import os
import stat
import urllib.parse

from worker.config import Settings
from worker.io.errors import ImageLoadError, describe_ref, too_large_error

# Pseudo-filesystems whose "files" are the machine's state (environment, memory, devices).
NEVER_READ = ("/proc", "/sys", "/dev")

_ALLOW_HINT = "CATALOG_FETCH_ALLOW_DIRS"


def file_url_path(url: str) -> str:
    """The local path a ``file://`` URL names (``file:///x`` or ``file://localhost/x``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError(
            "bad_reference",
            f"cannot load {describe_ref(url)!r}: file:// URLs must name a local file "
            f"(host {describe_ref(parts.netloc)!r} given)",
        )
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise ImageLoadError("bad_reference", f"cannot load {describe_ref(url)!r}: file:// URL has no absolute path")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        raise ImageLoadError("bad_reference", f"cannot load {describe_ref(url)!r}: path contains control characters")
    return path


def _normal(path: str) -> str:
    # POSIX keeps a leading "//" as possibly special; here it means "/" and must not let
    # "//proc" slip past a prefix check for "/proc".
    path = os.path.normpath(path)
    return "/" + path.lstrip("/") if path.startswith("/") else path


def _under(path: str, roots) -> bool:
    for root in roots:
        root = _normal(root)
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return True
    return False


def _allowed_roots(settings: Settings) -> list[str]:
    # Settings resolve the entries at start-up; resolving again costs a few lstat calls and
    # keeps settings built by hand (model_copy skips validation) from refusing their own files.
    return [_normal(os.path.realpath(entry)) for entry in settings.fetch_allow_dirs]


def vet_local_path(path: str, ref: str, settings: Settings) -> str:
    """The real path of ``path`` when it may be read; raise ``bad_reference`` otherwise."""
    shown = describe_ref(ref)
    roots = _allowed_roots(settings)
    if not roots:
        raise ImageLoadError(
            "bad_reference",
            f"refused to read {shown!r}: reading local files is off; list the directories images "
            f"may be read from in {_ALLOW_HINT}",
        )
    real = _normal(os.path.realpath(path))
    if _under(real, NEVER_READ) or _under(_normal(path), NEVER_READ):
        raise ImageLoadError(
            "bad_reference",
            f"refused to read {shown!r}: files under /proc, /sys and /dev are never read, "
            f"whatever {_ALLOW_HINT} lists",
        )
    if not _under(real, roots):
        how = "resolves to a file" if real != _normal(path) else "is"
        raise ImageLoadError(
            "bad_reference",
            f"refused to read {shown!r}: it {how} outside the directories listed in {_ALLOW_HINT}",
        )
    return real


def _not_found(path: str, exc: OSError) -> ImageLoadError:
    if isinstance(exc, FileNotFoundError):
        return ImageLoadError("not_found", f"image file {describe_ref(path)} does not exist")
    if isinstance(exc, NotADirectoryError):
        return ImageLoadError(
            "not_found", f"image file {describe_ref(path)} does not exist (a parent is not a directory)"
        )
    if isinstance(exc, PermissionError):
        return ImageLoadError("not_found", f"image file {describe_ref(path)} cannot be read: permission denied")
    return ImageLoadError("not_found", f"image file {describe_ref(path)} cannot be read: {exc.strerror or exc}")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symlink that changed while it was checked"
    return "not a regular file"


def _opened_path(fd: int) -> str | None:
    """The path the kernel reports for ``fd`` (Linux), or None where it cannot tell."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return path if path.startswith("/") else None


def read_local_file(path: str, ref: str, settings: Settings) -> bytes:
    """The bytes of the local file ``path`` (named by ``ref`` in the event), fenced as above."""
    real = vet_local_path(path, ref, settings)
    shown = describe_ref(ref)
    limit = settings.fetch_max_bytes
    try:
        before = os.lstat(real)
    except OSError as exc:
        raise _not_found(path, exc) from None
    if not stat.S_ISREG(before.st_mode):
        raise ImageLoadError(
            "bad_reference",
            f"cannot load {shown!r}: it is {_kind(before.st_mode)}; only regular files are read, "
            f"whatever {_ALLOW_HINT} lists",
        )
    if before.st_size > limit:
        raise too_large_error(f"image file {describe_ref(path)}", before.st_size, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        # O_NONBLOCK: never hang on a FIFO swapped in after the check; O_NOFOLLOW: never
        # follow a symlink swapped in for the resolved file.
        fd = os.open(real, flags)
    except OSError as exc:
        if getattr(exc, "errno", None) == getattr(os, "ELOOP", -1):
            raise ImageLoadError(
                "bad_reference", f"cannot load {shown!r}: the file was replaced by a symlink"
            ) from None
        raise _not_found(path, exc) from None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
            raise ImageLoadError("bad_reference", f"cannot load {shown!r}: the file changed while it was checked")
        opened = _opened_path(fh.fileno())
        if opened is not None and (_under(opened, NEVER_READ) or not _under(opened, _allowed_roots(settings))):
            raise ImageLoadError(
                "bad_reference",
                f"refused to read {shown!r}: the file opened lies outside the directories listed in {_ALLOW_HINT}",
            )
        if info.st_size > limit:
            raise too_large_error(f"image file {describe_ref(path)}", info.st_size, limit)
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = fh.read(min(1 << 20, limit + 1 - total))
            except OSError as exc:
                raise _not_found(path, exc) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # the file grew after the size check
                raise too_large_error(f"image file {describe_ref(path)}", None, limit)
    return b"".join(chunks)
