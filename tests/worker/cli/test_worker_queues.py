"""`catalog worker -Q` (issue 13, item 1): image analysis travels on the `gpu` queue on every
host, `images` names it on CPU-only hosts, and a queue no task is routed to stops start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.celery_app import QUEUES, ROUTES, expand_queues, routed_queues
from worker.cli.main import main
from worker.cli.services import _resolve_queues, _runs_images


def test_images_is_the_queue_image_tasks_are_routed_to() -> None:
    assert ROUTES["tasks.images.*"]["queue"] == expand_queues("images")[0] == "gpu"
    assert expand_queues("ingest,images,cpu") == ["ingest", "gpu", "cpu"]
    assert expand_queues(" gpu , images ") == ["gpu"]
    assert routed_queues() == list(QUEUES)
    with pytest.raises(ValueError, match="unknown queue 'image'"):
        expand_queues("ingest,image")


@pytest.mark.parametrize(("args", "expected"), [
    (["-Q", "ingest,images,cpu", "-c", "1"], ["-c", "1", "-Q", "ingest,gpu,cpu"]),
    (["--queues=images", "-P", "threads"], ["-P", "threads", "-Q", "gpu"]),
    (["-Qimages"], ["-Q", "gpu"]),
    (["--queues", "gpu"], ["-Q", "gpu"]),
    (["-c", "2"], ["-c", "2", "-Q", "ingest,gpu,cpu,train"]),
])
def test_worker_queues_are_expanded_before_celery_sees_them(args: list[str], expected: list[str]) -> None:
    assert _resolve_queues(args) == expected


def test_a_worker_on_the_images_alias_checks_its_models() -> None:
    assert _runs_images(_resolve_queues(["-Q", "images"]))


def test_unknown_queue_stops_the_worker_in_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CATALOG_STEPS", "metadata")
    result = CliRunner().invoke(main, ["worker", "-Q", "ingest,cpus"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: catalog worker --queues ingest,cpus: unknown queue 'cpus'; the queues "
                                    "are ingest, gpu, cpu, train, images (= gpu)")
    assert "Traceback" not in result.output and not (tmp_path / "catalog.db").exists()
