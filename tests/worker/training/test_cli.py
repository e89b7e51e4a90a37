"""`catalog retrain --now` and `catalog models list|show|promote|rollback` on a seeded catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.training import seed_catalogue
from worker.cli.main import main
from worker.config import reset_settings

pytestmark = pytest.mark.slow  # trains heads through the CLI (several seconds on 2 cores)


@pytest.fixture
def runner(train_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("CATALOG_DATABASE_URL", train_url)
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    return CliRunner()


def test_retrain_now_then_registry_commands(train_url: str, runner: CliRunner, tmp_path: Path) -> None:
    seed_catalogue(train_url)
    result = runner.invoke(main, ["retrain", "--now", "--what", "category"])
    assert result.exit_code == 0, result.output
    assert "category  promoted" in result.output and "zero-shot taxonomy map" in result.output
    champion = tmp_path / "data" / "models" / "category-head" / "champion.pt"
    assert champion.is_file()

    listed = runner.invoke(main, ["models", "list"])
    assert listed.exit_code == 0 and "champion" in listed.output and "accuracy" in listed.output
    version = listed.output.split()[0]  # NAME@VERSION of the newest
    assert version.startswith("category-head@")

    shown = runner.invoke(main, ["models", "show", version])
    assert shown.exit_code == 0, shown.output
    plot = next(line.split(None, 1)[1] for line in shown.output.splitlines() if line.strip().startswith("plot"))
    assert plot.endswith(".png") and Path(plot).is_file()
    assert "promoted: better than zero-shot taxonomy map" in shown.output

    rolled = runner.invoke(main, ["models", "rollback", "category-head"])
    assert rolled.exit_code == 0 and "champion now none" in rolled.output
    assert not champion.exists()
    again = runner.invoke(main, ["models", "rollback", "category-head"])
    assert again.exit_code == 1 and "has no champion" in again.output

    promoted = runner.invoke(main, ["models", "promote", version])
    assert promoted.exit_code == 0 and f"{version} is the champion" in promoted.output
    assert champion.is_file()

    unknown = runner.invoke(main, ["models", "show", "category-head@deadbeef"])
    assert unknown.exit_code == 1 and "no version 'deadbeef'" in unknown.output


def test_retrain_now_skips_with_reason_and_rejects_bad_target(runner: CliRunner) -> None:
    result = runner.invoke(main, ["retrain", "--now", "--what", "fraud", "--what", "detector", "--json"])
    assert result.exit_code == 0, result.output
    assert '"decision": "skipped"' in result.output and "too few flag verdicts" in result.output
    assert "detector fine-tuning is not implemented" in result.output
    bad = runner.invoke(main, ["retrain", "--now", "--what", "colour"])
    assert bad.exit_code == 2
    assert runner.invoke(main, ["retrain"]).exit_code == 2  # --now is required
