"""`catalog train sr` draws its progress bar only on a terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.images import write_photo
from worker.cli.main import main


@pytest.mark.slow  # trains a few steps (2-15 s)
def test_train_sr_draws_no_progress_bar_off_a_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(4):
        write_photo(photos / f"p{seed}.jpg", size=(160, 120), seed=seed)
    result = CliRunner().invoke(main, ["train", "sr", str(photos), "--steps", "4", "--eval-every", "4",
                                       "--batch-size", "2", "--patch", "32"])
    assert result.exit_code == 0, result.output
    assert "it/s" not in result.output and "step/s" not in result.output and "\r" not in result.output
    assert "train sr x2" not in result.output  # tqdm's bar description
