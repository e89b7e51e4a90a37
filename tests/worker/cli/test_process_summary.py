"""`catalog process` on a folder: a progress bar on a terminal only, and a summary at the end
(images done and failed by code, the listing, the time) on stderr (issue 13, item 10)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.images import write_not_an_image, write_photo, write_truncated_jpeg
from tests.support.procs import CATALOG, ROOT, catalog_env
from worker.cli.main import main

SUMMARY = re.compile(r"^summary: 4 image\(s\) in 1 listing \((?P<listing>[^,]+), decision incomplete\) in "
                     r"(?P<seconds>\d+\.\d) s: 2 done, 2 failed \(not_an_image 1, truncated 1\)$", re.M)


def folder(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "a.jpg", size=(120, 90), seed=1)
    write_photo(photos / "b.png", size=(120, 90), seed=2)
    write_not_an_image(photos / "c.jpg")
    write_truncated_jpeg(photos / "d.jpg")
    return photos


def test_summary_off_a_terminal_and_no_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_STEPS", "metadata")
    photos = str(folder(tmp_path))
    result = CliRunner().invoke(main, ["process", photos, "--listing-id", "L-folder"])
    assert result.exit_code == 1, result.output
    match = SUMMARY.search(result.stderr)
    assert match is not None, result.stderr
    assert match["listing"] == "L-folder"
    assert "img/s" not in result.stderr and "\r" not in result.stderr  # no bar off a terminal
    as_json = CliRunner().invoke(main, ["process", photos, "--listing-id", "L-folder", "--json"])
    assert as_json.exit_code == 1 and SUMMARY.search(as_json.output) is None
    json.loads(as_json.output)  # --json: one JSON document, even with stderr mixed in


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """stderr on a pseudo-terminal: the bar is drawn, and the summary still comes at the end."""
    env = catalog_env(data_dir=str(tmp_path / "data"), steps="metadata")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # tqdm draws nothing in 0 columns
    proc = subprocess.Popen([*CATALOG, "process", str(folder(tmp_path))], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = seen.decode(errors="replace").replace("\r\n", "\n")
    assert proc.returncode == 1, text
    assert re.search(r"images: +100%.*4/4", text), text  # tqdm's bar, redrawn with \r
    assert SUMMARY.search(text) is not None, text
