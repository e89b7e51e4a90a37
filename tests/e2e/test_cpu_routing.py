"""A CPU-only deployment processes images (issue 13, item 1): image tasks travel on the `gpu`
queue whatever the device, so a worker started as docs/operations.md tells a CPU-only operator
(`catalog worker -Q ingest,images,cpu`) must take them; a worker on `-Q ingest,cpu` alone (what
docker/README.md used to say) never does, and `catalog status` says so."""

from __future__ import annotations

import json
import socket
from functools import partial

import pytest

from tests.e2e.test_redis_postgres import deployment, event, listing_status, start  # noqa: F401  (fixture)
from tests.support.images import write_photo
from tests.support.procs import run_catalog, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def _status(env: dict[str, str]) -> dict:
    out = run_catalog(["status", "--json", "--inspect-timeout", "3"], env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _workers_answering(env: dict[str, str], count: int) -> dict | None:
    report = _status(env)
    return report if len(report["workers"] or {}) >= count else None


def test_cpu_only_worker_as_documented_processes_images(deployment: dict) -> None:  # noqa: F811
    d, dsn, server = deployment, deployment["dsn"], deployment["server"]
    host = socket.gethostname()
    write_photo(d["photos"] / "p.jpg", size=(320, 240), seed=7)
    d["redis"].xadd("e2e:events", {"event": event("L-cpu", [server.url("/p.jpg")])})

    # The old split: events are applied, the image task waits on `gpu` with nobody to take it.
    ingest = start(d, "ingest", "ingest")
    events_worker = start(d, "events", "worker", "-Q", "ingest,cpu", "--concurrency", "1", "-n", "events@%h")
    wait_for(lambda: d["redis"].llen("gpu") >= 1, 120, "the image task queued on gpu", [ingest, events_worker])
    report = wait_for(partial(_workers_answering, d["env"], 1), 60, "the worker answering", [events_worker])
    assert isinstance(report, dict)
    assert listing_status(dsn, "L-cpu") == "processing"
    assert report["queued"]["gpu"] >= 1
    assert report["workers"][f"events@{host}"] == {"queues": ["ingest", "cpu"], "pool": "prefork", "concurrency": 1}
    assert [w for w in report["warnings"] if "'gpu'" in w and "no live worker" in w], report["warnings"]

    # What docs/operations.md tells a CPU-only operator to run.
    cpu_worker = start(d, "cpu", "worker", "-Q", "ingest,images,cpu", "--concurrency", "1", "-n", "cpu@%h")
    wait_for(lambda: listing_status(dsn, "L-cpu") == "done", 120, "the image analysed on a CPU-only worker",
             [ingest, cpu_worker])
    assert d["redis"].llen("gpu") == 0
    report = wait_for(partial(_workers_answering, d["env"], 2), 60, "both workers answering", [cpu_worker])
    assert isinstance(report, dict)
    assert report["workers"][f"cpu@{host}"]["queues"] == ["ingest", "gpu", "cpu"]
    assert report["warnings"] == []
    assert report["images_per_min"]["1m"] >= 1 and report["backlog"]["pending_images"] == 0

    # The container healthchecks of these processes (docker/compose.yaml).
    ok = run_catalog(["health", "worker", "--node", f"cpu@{host}"], d["env"])
    assert ok.returncode == 0 and "answered a ping" in ok.stdout, ok.stdout + ok.stderr
    ok = run_catalog(["health", "ingest"], d["env"])
    assert ok.returncode == 0 and "healthy" in ok.stdout, ok.stdout + ok.stderr
    cpu_worker.stop()
    gone = run_catalog(["health", "worker", "--node", f"cpu@{host}", "--timeout", "1"], d["env"])
    assert gone.returncode == 1 and "did not answer" in gone.stderr, gone.stdout + gone.stderr
