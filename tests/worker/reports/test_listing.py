"""`catalog show` / `catalog process` never present an incomplete analysis as plain done/ok
(issue 12, items 11 and 12), and `catalog process` exits non-zero when an image failed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from tests.support.pipeline import analyze_all, apply, event, photo
from tests.support.services import unique
from worker.cli.main import main
from worker.config import Settings
from worker.pipeline import registry
from worker.pipeline.contract import ImageContext, StepResult
from worker.reports.listing import listing_report, problems, render_report


class _NoGpuStep:
    name: ClassVar[str] = "nogpu"
    requires: ClassVar[tuple[str, ...]] = ()

    def version(self, settings: Settings) -> str:
        return "nogpu@1"

    def run(self, ctx: ImageContext) -> StepResult:
        raise RuntimeError("CUDA requested but no GPU is visible")


def test_show_marks_an_incomplete_analysis(db_url: str, tmp_path: Path, make_settings,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STEP_REGISTRY, "nogpu", f"{__name__}:_NoGpuStep")
    monkeypatch.setitem(registry._instances, "nogpu", _NoGpuStep())
    settings = make_settings(database_url=db_url, steps=["metadata", "nogpu"], fetch_allow_dirs=[str(tmp_path)])
    listing = unique("L")
    out = apply(db_url, event(listing, [photo(tmp_path / "a.png"), str(tmp_path / "gone.jpg")]))
    analyze_all(db_url, settings, out.images_to_analyze)
    report = listing_report(settings, listing)
    done, failed = report["images"]
    assert (done["status"], done["complete"], done["incomplete_steps"]) == ("done", False, ["nogpu failed"])
    assert failed["status"] == "failed" and failed["complete"] is False
    assert report["listing"]["fraud_decision"] == "incomplete"
    assert problems(report) == (1, 1, 2)
    text = render_report(report)
    assert "[done, incomplete: nogpu failed]" in text
    assert "-> incomplete  (not every image was fully analysed)" in text
    assert "[done]" not in text


def _write(path: Path) -> str:
    return photo(path, (10, 200, 30), size=(64, 48))


@pytest.mark.parametrize(("bad", "code"), [(False, 0), (True, 1)])
def test_process_exits_non_zero_when_an_image_failed(bad: bool, code: int, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_STEPS", "metadata")
    paths = [_write(tmp_path / "ok.png")]
    if bad:
        (tmp_path / "bad.jpg").write_text("this is text, not a photo")
        paths.append(str(tmp_path / "bad.jpg"))
    result = CliRunner().invoke(main, ["process", *paths, "--json"])
    assert result.exit_code == code, result.output
    report: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{"):])
    assert [i["status"] for i in report["images"]] == (["done", "failed"] if bad else ["done"])
    assert report["listing"]["fraud_decision"] == ("incomplete" if bad else "ok")
    text = CliRunner().invoke(main, ["process", *paths])  # again, as text: same exit, a count on stderr
    assert text.exit_code == code
    assert ("catalog process: 1 of 2 image(s) failed" in text.stderr) is bad
