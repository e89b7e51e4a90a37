"""Metrics and logs of real processes: a prefork `catalog worker` (concurrency 2) and a
`catalog ingest`, each serving /metrics on CATALOG_METRICS_PORT and logging JSON lines; a
listing goes through them and the counters move between two scrapes over HTTP."""

from __future__ import annotations

import json
import socket
import urllib.request
from functools import partial

import pytest

from tests.e2e.test_redis_postgres import _is_done, deployment, event, start  # noqa: F401  (fixture)
from tests.support.images import write_not_an_image, write_photo
from tests.support.procs import Proc, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples | None:
    """The samples /metrics on ``port`` serves, or None while nothing answers there."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (pids and versions aside)."""
    return sum(v for (n, got), v in samples.items()
               if n == name and all(dict(got).get(k) == want for k, want in labels.items()))


def json_lines(proc: Proc) -> list[dict]:
    """Every line the process wrote, each parsed as one JSON object (fails on any other line)."""
    lines = [line for line in proc.output().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return parsed


def test_worker_and_ingest_metrics_move_while_a_listing_is_processed(deployment: dict) -> None:  # noqa: F811
    d, dsn, server = deployment, deployment["dsn"], deployment["server"]
    write_photo(d["photos"] / "front.jpg", size=(320, 240), seed=7)
    write_not_an_image(d["photos"] / "fake.jpg")
    worker_port, ingest_port = free_port(), free_port()
    base = dict(d["env"], CATALOG_LOG_FORMAT="json", CATALOG_METRICS_DIR=str(d["tmp"] / "metrics"))
    worker = Proc(["worker", "--concurrency", "2", "--pool", "prefork"],
                  dict(base, CATALOG_METRICS_PORT=str(worker_port)), d["tmp"] / "worker.log")
    ingest = Proc(["ingest"], dict(base, CATALOG_METRICS_PORT=str(ingest_port)), d["tmp"] / "ingest.log")
    d["procs"].extend([worker, ingest])
    procs = [worker, ingest]
    before = wait_for(partial(scrape, worker_port), 120, "the worker's /metrics", procs)
    ingest_before = wait_for(partial(scrape, ingest_port), 60, "the ingest's /metrics", procs)
    assert isinstance(before, dict) and isinstance(ingest_before, dict)
    assert value(before, "catalog_images_total") == 0
    assert value(before, "catalog_backlog_scrape_ok") == 1 and ("catalog_queue_depth", (("queue", "gpu"),)) in before

    d["redis"].xadd("e2e:events", {"event": event("L-metrics", [server.url("/front.jpg"), server.url("/fake.jpg")],
                                                  event_id="evt-metrics")})
    d["redis"].xadd("e2e:events", {"event": "{broken"})
    wait_for(partial(_is_done, dsn, "L-metrics"), 120, "L-metrics done", procs)
    after = wait_for(lambda: (s := scrape(worker_port)) and value(s, "catalog_images_total") >= 2 and s,
                     30, "the image counters", procs)
    ingest_after = scrape(ingest_port)
    assert isinstance(after, dict) and isinstance(ingest_after, dict)

    # Worker: summed over its two pool processes.
    assert value(after, "catalog_images_total", status="done", failure_code="") == 1
    assert value(after, "catalog_images_total", status="failed", failure_code="not_an_image") == 1
    assert value(after, "catalog_step_duration_seconds_count", step="metadata", status="ok") \
        - value(before, "catalog_step_duration_seconds_count", step="metadata", status="ok") == 1
    assert value(after, "catalog_image_duration_seconds_count") == 2
    assert value(after, "catalog_events_applied_total", type="listing.created", outcome="applied") == 1
    assert value(after, "catalog_images_in_flight") == 0
    # Ingest: the event queued, the broken entry dead-lettered; the stream is read up.
    assert value(ingest_after, "catalog_ingest_events_total", type="listing.created", outcome="queued") \
        - value(ingest_before, "catalog_ingest_events_total", type="listing.created", outcome="queued") == 1
    assert value(ingest_after, "catalog_dead_letters_total", code="not_json") == 1
    assert value(ingest_after, "catalog_stream_lag", stream="e2e:events") == 0
    assert value(ingest_after, "catalog_stream_length", stream="e2e:dead") == 1

    # JSON logs, every line, also from the prefork children that analysed the images.
    images = [x for x in json_lines(worker) if "image_id" in x and x.get("logger") == "catalog.observe"]
    assert sorted((x["listing"], x["event_id"], x["status"], x["failure_code"]) for x in images) == [
        ("L-metrics", "evt-metrics", "done", None), ("L-metrics", "evt-metrics", "failed", "not_an_image")]
    assert [x["decision"] for x in images if x["decision"]] == ["incomplete"]
    applied = [x for x in json_lines(worker) if x.get("stage") == "apply"]
    assert [(x["event_id"], x["listing"], x["seller"], x["outcome"], x["images_queued"]) for x in applied] == [
        ("evt-metrics", "L-metrics", "seller-1", "applied", 2)]
    assert {"ts", "level", "logger", "msg"} <= set(applied[0])
    queued = [x for x in json_lines(ingest) if x.get("stage") == "ingest"]
    assert [(x.get("event_id"), x.get("listing"), x["outcome"]) for x in queued] == [
        ("evt-metrics", "L-metrics", "queued"), (None, None, "dead_lettered")]

