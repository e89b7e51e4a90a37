"""The `catalog` command line: help everywhere, idempotent migrations, in-process processing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.images import write_photo
from worker.cli.main import main


def all_commands(group=main, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, (*prefix, name))


PASSTHROUGH = {("worker",), ("beat",)}  # their --help goes on to Celery's: see below


@pytest.mark.parametrize("path", [p for p in [(), *all_commands()] if p not in PASSTHROUGH],
                         ids=lambda p: " ".join(p) or "catalog")
def test_every_command_has_useful_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) >= 4


@pytest.mark.parametrize(("command", "ours", "celerys"),
                         [("worker", "--pool threads", "--concurrency"), ("beat", "exactly one", "--schedule")])
def test_passthrough_help_shows_ours_and_celerys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 command: str, ours: str, celerys: str) -> None:
    import os
    import subprocess
    import sys

    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "worker.cli", command, "--help"], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert ours in out.stdout and celerys in out.stdout


def test_db_upgrade_is_idempotent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    first = runner.invoke(main, ["db", "upgrade"])
    second = runner.invoke(main, ["db", "upgrade"])
    assert first.exit_code == 0 and "migrated from empty" in first.output
    assert second.exit_code == 0 and "already at" in second.output


def test_bad_configuration_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_FETCH_MAX_BYTES", "-5")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code != 0 and "CATALOG_FETCH_MAX_BYTES" in result.output


def test_process_runs_the_pipeline_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_STEPS", "metadata")
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "a.jpg", size=(320, 240), seed=1)
    write_photo(photos / "b.png", size=(200, 100), seed=2)
    (photos / "notes.txt").write_text("ignored: not an image suffix")
    result = CliRunner().invoke(main, ["process", str(photos), "--seller", "s9", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["listing"]["status"] == "done" and report["listing"]["seller_id"] == "s9"
    assert [(i["width"], i["height"], i["status"]) for i in report["images"]] == [(320, 240, "done"),
                                                                                  (200, 100, "done")]
    assert all(len(i["phash"]) == 16 for i in report["images"])
    text = CliRunner().invoke(main, ["show", report["listing"]["id"]])
    assert text.exit_code == 0 and "phash" in text.output


def test_process_rejects_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["process", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_submit_dead_letters_invalid_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    events = tmp_path / "events.jsonl"
    events.write_text('{"event_id": "x"}\n')
    result = CliRunner().invoke(main, ["submit", str(events)])
    # Rejected events make the exit status non-zero; lines are numbered from 1, like an editor.
    assert result.exit_code == 1 and "rejected 1" in result.output
    assert f"{events}#1: rejected" in result.output and "#0" not in result.output


@pytest.mark.parametrize(("args", "expected"), [
    (["--concurrency", "2"], 4), (["-c", "8"], 1), (["-c8"], 1), (["--pool", "threads", "-c", "8"], 8), ([], 1),
])
def test_worker_shares_cores_between_pool_processes(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                    expected: int) -> None:
    from worker.cli.services import _share_cores
    from worker.config import get_settings

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("CATALOG_TORCH_THREADS", raising=False)  # restored (removed) afterwards
    if not args:
        monkeypatch.setenv("CATALOG_TORCH_THREADS", "1")  # an explicit setting always wins
    assert _share_cores(get_settings(), args).torch_threads == expected


def test_models_import_installs_verified_ports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["models", "import", "waifu2x-photo"])
    assert result.exit_code == 0, result.output
    assert "installed" in result.output and "dB vs ncnn" in result.output
    assert (tmp_path / "models" / "waifu2x-photo.pt").exists()
    bad = CliRunner().invoke(main, ["models", "import", "no-such-model"])
    assert bad.exit_code == 2 and "unknown model" in bad.output


def test_train_sr_writes_checkpoint_and_metrics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(4):
        write_photo(photos / f"p{seed}.jpg", size=(160, 120), seed=seed)
    result = CliRunner().invoke(main, ["train", "sr", str(photos), "--steps", "3", "--eval-every", "3",
                                       "--batch-size", "2", "--patch", "32"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    assert metrics["config"]["steps"] == 3 and metrics["eval_images"]
    assert (tmp_path / "data" / "models" / "inhouse-x2.pt").exists()


def test_unknown_step_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_STEPS", "metadata,telepathy")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code != 0 and "CATALOG_STEPS" in result.output and "telepathy" in result.output


@pytest.mark.parametrize(("args", "device", "cuda", "expected"), [
    ([], "auto", True, ["--pool", "threads", "--concurrency", "8"]),
    (["-c", "4"], "auto", True, ["-c", "4", "--pool", "threads"]),
    (["--pool", "prefork"], "cuda", True, ["--pool", "prefork"]),
    ([], "auto", False, []),
    ([], "cpu", True, []),
])
def test_gpu_workers_default_to_a_threads_pool(args: list[str], device: str, cuda: bool, expected: list[str]) -> None:
    from worker.cli.services import _gpu_pool
    from worker.config import load_settings

    assert _gpu_pool(load_settings(device=device), list(args), cuda=cuda) == expected


def test_status_counts_failures_by_code_on_the_embedded_default(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    from tests.support.images import write_not_an_image

    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_STEPS", "metadata")
    write_photo(tmp_path / "ok.jpg", size=(64, 48))
    write_not_an_image(tmp_path / "bad.jpg")
    # catalog process exits 1 when an image failed: bad.jpg is not an image
    assert CliRunner().invoke(main, ["process", str(tmp_path / "ok.jpg"), str(tmp_path / "bad.jpg")]).exit_code == 1
    result = CliRunner().invoke(main, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == {"done": 1, "failed": 1}
    assert report["failed_images_by_code"] == {"not_an_image": 1}
    assert report["broker"] == "filesystem" and report["queued"]["gpu"] == 0


def test_process_reads_what_it_was_given_and_nothing_a_symlink_points_to(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """`catalog process` needs no CATALOG_FETCH_ALLOW_DIRS for the paths it is given, and
    that allowance does not reach outside them (issue 12, item 1)."""
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CATALOG_STEPS", "metadata")
    photos = tmp_path / "photos"
    write_photo(photos / "a.jpg", size=(64, 48))
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (photos / "b.jpg").symlink_to(secret)
    single = write_photo(tmp_path / "single.png", size=(30, 20))
    result = CliRunner().invoke(main, ["process", str(photos), single.as_uri(), "--json"])
    report = json.loads(result.output[result.output.index("{"):])
    by_name = {Path(i["url"]).name: i for i in report["images"]}
    assert by_name["a.jpg"]["status"] == "done" and by_name["single.png"]["status"] == "done"
    refused = by_name["b.jpg"]
    assert refused["status"] == "failed" and refused["error"].startswith("bad_reference:")
    assert "CATALOG_FETCH_ALLOW_DIRS" in refused["error"] and "root:" not in refused["error"]


def test_allow_local_adds_paths_once() -> None:
    from worker.cli.local import allow_local
    from worker.config import load_settings

    settings = load_settings()
    wider = allow_local(settings, ["/srv/a", "/srv/b.jpg"])
    assert wider.fetch_allow_dirs == ["/srv/a", "/srv/b.jpg"] and settings.fetch_allow_dirs == []
    assert allow_local(wider, ["/srv/a"]) is wider


def test_config_never_prints_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATABASE_URL", "postgresql+psycopg2://app:s3cret-db@db.internal:5432/catalog")
    monkeypatch.setenv("CATALOG_BROKER_URL", "redis://:hunter2-redis@redis.internal:6379/0")
    monkeypatch.setenv("CATALOG_API_SECRET", "api-signing-key-0123456789abcdef")
    for args in (["config"], ["config", "--json"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        for secret in ("s3cret-db", "hunter2-redis", "api-signing-key"):
            assert secret not in result.output
        assert "app:***@db.internal:5432" in result.output


def test_config_json_prints_json_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CATALOG_API_SECRET", "api-signing-key-0123456789abcdef")
    result = CliRunner().invoke(main, ["config", "--json"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.output)["settings"]
    assert values["CATALOG_DATABASE_URL"] is None and values["CATALOG_BATCH_MAX_SIZE"] is None
    assert values["CATALOG_STEPS"][0] == "metadata" and isinstance(values["CATALOG_STEPS"], list)
    assert values["CATALOG_MAX_ATTEMPTS"] == 3 and values["CATALOG_FRAUD_WEIGHTS"]["nsfw"] == 0.7
    assert values["CATALOG_DATA_DIR"] == str(tmp_path) and values["CATALOG_API_SECRET"] == "**********"


def test_config_reads_secret_files_and_masks_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "db_url"
    secret.write_text("postgresql://app:file-s3cret@db.internal/catalog\n")
    monkeypatch.setenv("CATALOG_DATABASE_URL_FILE", str(secret))
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0, result.output
    assert "file-s3cret" not in result.output
    assert "postgresql+psycopg2://app:***@db.internal/catalog" in result.output


DOWN_DB = "postgresql://app:pw-not-shown@127.0.0.1:1/catalog"  # nothing listens on port 1


@pytest.mark.parametrize("args", [["status"], ["db", "upgrade"], ["show", "L-1"], ["flags", "list"]])
def test_database_down_is_one_sentence(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setenv("CATALOG_DATABASE_URL", DOWN_DB)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Error: cannot use the database postgresql+psycopg2://app:***@127.0.0.1:1/catalog (CATALOG_DATABASE_URL): ")
    assert "pw-not-shown" not in result.output


def test_debug_keeps_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy.exc

    monkeypatch.setenv("CATALOG_DATABASE_URL", DOWN_DB)
    result = CliRunner().invoke(main, ["--debug", "status"])
    assert result.exit_code == 1 and isinstance(result.exception, sqlalchemy.exc.OperationalError)
    monkeypatch.setenv("CATALOG_LOG_LEVEL", "DEBUG")
    result = CliRunner().invoke(main, ["status"])
    assert isinstance(result.exception, sqlalchemy.exc.OperationalError)


def test_redis_down_is_one_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CATALOG_REDIS_URL", "redis://:redis-pw@127.0.0.1:1/0")
    result = CliRunner().invoke(main, ["ingest", "--burst"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: cannot reach Redis at redis://:***@127.0.0.1:1/0 (CATALOG_REDIS_URL")
    assert "redis-pw" not in result.output and "Traceback" not in result.output


def test_broker_down_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    import kombu.exceptions

    from worker.cli.common import connection_sentence

    monkeypatch.setenv("CATALOG_BROKER_URL", "redis://:broker-pw@127.0.0.1:1/0")
    sentence = connection_sentence(kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:1."))
    assert sentence == ("cannot reach the broker redis://:***@127.0.0.1:1/0 (CATALOG_BROKER_URL): "
                        "Error 111 connecting to 127.0.0.1:1.")
    assert connection_sentence(ValueError("a bug")) is None  # anything else keeps its traceback


def test_worker_waits_for_the_database_then_gives_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import click

    from worker.cli.common import wait_for_database
    from worker.config import load_settings

    settings = load_settings(database_url=DOWN_DB, db_retry_for=2)
    with pytest.raises(click.ClickException, match=r"cannot use the database .*\(waited 2 s, CATALOG_DB_RETRY_FOR\)"):
        wait_for_database(settings, every=0.5)
    waits = [r for r in caplog.records if r.getMessage().startswith("waiting for the database")]
    assert len(waits) >= 2 and all("pw-not-shown" not in r.getMessage() for r in waits)


def test_worker_wait_returns_once_the_database_answers(tmp_path: Path) -> None:
    from worker.cli.common import wait_for_database
    from worker.config import load_settings

    wait_for_database(load_settings(data_dir=tmp_path, db_retry_for=0))  # SQLite: at once
