"""Progress output only where a person watches it: on a terminal.

``show_progress()`` decides whether a progress bar is drawn (stderr is a TTY).
``native_output_silenced()`` silences what compiled libraries write straight to file
descriptor 2 (Real-ESRGAN's ncnn build prints ``0.00%`` per tile), which Python's
``sys.stderr`` cannot redirect.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TextIO


def show_progress(stream: TextIO | None = None) -> bool:
    """Whether to draw a progress bar on ``stream`` (default stderr): only on a terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or a stand-in without isatty
        return False


@contextlib.contextmanager
def native_output_silenced(fd: int = 2) -> Iterator[None]:
    """Send what native code writes to ``fd`` to /dev/null meanwhile (Python's own logging
    to ``sys.stderr`` is flushed first and goes on working afterwards)."""
    with contextlib.suppress(AttributeError, ValueError):
        sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no such descriptor (e.g. a daemon without stderr): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
