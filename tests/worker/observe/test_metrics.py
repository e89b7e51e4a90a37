"""Metric hooks, the backlog gauges read on scrape, multiprocess mode, and the API's /metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.support.pipeline import analyze_all, apply, event, photo
from tests.support.services import REDIS_URL, TrackingRedis, unique
from worker.config import load_settings
from worker.intake.ingest import StreamIngestor
from worker.observe import metrics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_an_analysed_image_moves_the_image_and_step_metrics(tmp_path: Path, sqlite_template: Path) -> None:
    db = tmp_path / "c.db"
    shutil.copy(sqlite_template, db)
    url = f"sqlite:///{db}"
    settings = load_settings(data_dir=tmp_path / "data", database_url=url, steps=["metadata"],
                             fetch_allow_dirs=[str(tmp_path)])
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    version = None
    before = (sample("catalog_images_total", status="done", failure_code=""),
              sample("catalog_images_total", status="failed", failure_code="not_an_image"),
              sample("catalog_image_duration_seconds_count", status="done"))
    ids = apply(url, event(unique("L"), [photo(tmp_path / "a.png"), str(tmp_path / "bad.jpg")])).images_to_analyze
    done, failed = analyze_all(url, settings, ids)
    assert (done.status, failed.status) == ("done", "failed")
    version = done.steps[0].version
    after = (sample("catalog_images_total", status="done", failure_code=""),
             sample("catalog_images_total", status="failed", failure_code="not_an_image"),
             sample("catalog_image_duration_seconds_count", status="done"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    steps = sample("catalog_step_duration_seconds_count", step="metadata", model_version=version, status="ok")
    assert steps >= 1
    assert sample("catalog_images_in_flight") == 0  # back to zero once the runs ended


def test_batcher_records_batch_sizes() -> None:
    from worker.models.batcher import DynamicBatcher, Prepared

    name = unique("batcher-test")
    batcher: DynamicBatcher[int] = DynamicBatcher(lambda items: [1 for _ in items], lambda out, meta: out,
                                                  max_size=4, timeout_ms=200, name=name)
    try:
        futures = [batcher.submit(Prepared(tensor=None, meta={})) for _ in range(3)]
        assert [f.result(timeout=10) for f in futures] == [1, 1, 1]
    finally:
        batcher.close()
    assert sample("catalog_batch_size_count", model=name) == len(batcher.batch_sizes)
    assert sample("catalog_batch_size_sum", model=name) == 3


def test_ingest_counts_queued_events_and_dead_letters_by_code(redis_client: TrackingRedis,
                                                              make_settings) -> None:
    stream, dead = unique("obs-events"), unique("obs-dead")
    settings = make_settings(redis_url=REDIS_URL, events_stream=stream, dead_letter_stream=dead)
    good = json.dumps(event(unique("L"), ["https://example.com/a.jpg"]))
    redis_client.xadd(stream, {"event": good})
    redis_client.xadd(stream, {"event": "{not json"})
    redis_client.xadd(stream, {"other": "x"})
    before = (sample("catalog_ingest_events_total", type="listing.created", outcome="queued"),
              sample("catalog_dead_letters_total", code="not_json"),
              sample("catalog_dead_letters_total", code="no_event_field"))
    published: list = []
    client = TrackingRedis.from_url(REDIS_URL)
    try:
        StreamIngestor(client, settings, published.append, consumer="c1").run(burst=True)
    finally:
        client.close()
    after = (sample("catalog_ingest_events_total", type="listing.created", outcome="queued"),
             sample("catalog_dead_letters_total", code="not_json"),
             sample("catalog_dead_letters_total", code="no_event_field"))
    assert len(published) == 1
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


def _collect(collector: metrics.BacklogCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in collector.collect() for s in fam.samples}


def test_backlog_collector_reads_queue_depth_stream_lag_and_pending(redis_client: TrackingRedis) -> None:
    q1, q2, stream, dead, group = (unique("obs-q"), unique("obs-q"), unique("obs-stream"), unique("obs-dead"),
                                   "obs-group")
    redis_client.rpush(q1, "a", "b", "c")
    redis_client.xgroup_create(stream, group, id="0", mkstream=True)
    for n in range(3):
        redis_client.xadd(stream, {"event": str(n)})
    redis_client.xreadgroup(group, "c1", {stream: ">"}, count=1)  # one read, not acknowledged
    redis_client.xadd(dead, {"code": "x"})
    collector = metrics.BacklogCollector(queues=[q1, q2], embedded_broker=False, broker_url=REDIS_URL,
                                         queue_dir=None, redis_url=REDIS_URL, stream=stream, group=group,
                                         dead_letter_stream=dead)
    got = _collect(collector)
    assert got[("catalog_queue_depth", (("queue", q1),))] == 3
    assert got[("catalog_queue_depth", (("queue", q2),))] == 0
    assert got[("catalog_stream_lag", (("group", group), ("stream", stream)))] == 2
    assert got[("catalog_stream_pending", (("group", group), ("stream", stream)))] == 1
    assert got[("catalog_stream_length", (("stream", stream),))] == 3
    assert got[("catalog_stream_length", (("stream", dead),))] == 1
    assert got[("catalog_backlog_scrape_ok", ())] == 1


def test_backlog_collector_reports_an_unreachable_broker_instead_of_failing() -> None:
    collector = metrics.BacklogCollector(queues=["gpu"], embedded_broker=False, broker_url="redis://127.0.0.1:1/0",
                                         queue_dir=None, redis_url=None, stream="s", group="g",
                                         dead_letter_stream="d")
    got = _collect(collector)
    assert got[("catalog_backlog_scrape_ok", ())] == 0
    assert not any(name == "catalog_queue_depth" for name, _ in got)


def test_backlog_collector_counts_the_embedded_queue_files(tmp_path: Path) -> None:
    (tmp_path / "1_a.gpu.msg").write_text("{}")
    (tmp_path / "2_b.gpu.msg").write_text("{}")
    (tmp_path / "3_c.ingest.msg").write_text("{}")
    collector = metrics.BacklogCollector(queues=["ingest", "gpu", "cpu"], embedded_broker=True, broker_url="",
                                         queue_dir=tmp_path, redis_url=None, stream="s", group="g",
                                         dead_letter_stream="d")
    got = _collect(collector)
    assert [got[("catalog_queue_depth", (("queue", q),))] for q in ("ingest", "gpu", "cpu")] == [1, 2, 0]


def test_multiprocess_mode_sums_the_files_of_every_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prometheus_client.values as values
    from prometheus_client import Counter, Gauge

    metrics.metrics()  # this process's own metrics stay in memory whatever happens below
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "")  # so that the teardown restores what was there
    stale = tmp_path / "worker-999999999"
    stale.mkdir(parents=True)
    folder = metrics.prepare_multiprocess(tmp_path, "worker")
    assert folder.name.startswith("worker-") and folder.is_dir() and not stale.exists()
    counter = Counter("catalog_test_multiprocess_total", "test", registry=None)
    counter.inc(3)
    assert list(folder.glob("counter_*.db"))
    gauge = Gauge("catalog_test_live", "test", registry=None, multiprocess_mode="livesum")
    gauge.set(5)
    (own,) = folder.glob("gauge_livesum_*.db")
    shutil.copy(own, folder / "gauge_livesum_999999999.db")  # a pool process killed without notice
    got = scrape(metrics.exposition()[0].decode())
    assert got[("catalog_test_multiprocess_total", ())] == 3
    assert got[("catalog_test_live", ())] == 5  # the dead process's gauge is dropped, not summed
    assert not (folder / "gauge_livesum_999999999.db").exists()
