"""Prometheus metrics (prometheus_client) of workers, ingest and the API.

Metric objects are created on first use, after the process knows whether it runs in
multiprocess mode: ``catalog worker`` and ``catalog ingest`` with ``CATALOG_METRICS_PORT``
set call :func:`prepare_multiprocess` before anything imports prometheus_client's value class,
so every prefork child writes its values to files in one directory and the one HTTP server
of the parent (:func:`serve`) sums them. Without a port the values stay in process memory,
which costs next to nothing.

Every hook here swallows its own errors: a metric must never fail an image or an event.
Names and labels are listed in docs/operations.md ("Monitoring").
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds buckets for one step or one image on CPU or GPU: 5 ms to 2 min.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

F = TypeVar("F", bound=Callable[..., Any])


class _Metrics:
    """The process's metric objects (see the module doc for why they are made lazily)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.events_ingested = Counter(
            "catalog_ingest_events_total", "Stream entries `catalog ingest` handled: queued as work, "
            "or dead-lettered (type 'invalid').", ["type", "outcome"])
        self.dead_letters = Counter(
            "catalog_dead_letters_total", "Entries copied to the dead-letter stream, by code.", ["code"])
        self.events_applied = Counter(
            "catalog_events_applied_total", "Events the worker applied to the database, by outcome "
            "(applied, duplicate, stale).", ["type", "outcome"])
        self.images = Counter(
            "catalog_images_total", "Image analysis runs that ended, by status (done, failed, skipped, "
            "retry) and failure code (empty unless failed or retried).", ["status", "failure_code"])
        self.image_seconds = Histogram(
            "catalog_image_duration_seconds", "Wall time of one image analysis run (claim, fetch, "
            "steps, store), by status.", ["status"], buckets=SECONDS_BUCKETS)
        self.steps = Histogram(
            "catalog_step_duration_seconds", "Time one analysis step took on one image, by step, model "
            "version and step status.", ["step", "model_version", "status"], buckets=SECONDS_BUCKETS)
        self.batch_size = Histogram(
            "catalog_batch_size", "Items per model forward of the dynamic batcher, by model.", ["model"],
            buckets=BATCH_BUCKETS)
        self.in_flight = Gauge(
            "catalog_images_in_flight", "Images being analysed right now.", multiprocess_mode="livesum")
        self.gpu_memory = Gauge(
            "catalog_gpu_memory_bytes", "CUDA memory of the process's models, by device and kind "
            "(allocated, reserved); only where CUDA is in use.", ["device", "kind"],
            multiprocess_mode="liveall")
        self.http_requests = Counter(
            "catalog_http_requests_total", "Requests the API answered, by method, route and status code.",
            ["method", "route", "status"])
        self.http_seconds = Histogram(
            "catalog_http_request_duration_seconds", "Time to answer one API request, by route.",
            ["route"], buckets=HTTP_BUCKETS)


_metrics: _Metrics | None = None
_lock = threading.Lock()


def metrics() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def _quiet(func: F) -> F:
    """Metrics never break the work: a failing hook is logged at debug level."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception:
            log.debug("metric %s failed", func.__name__, exc_info=True)
            return None

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


# --- hooks (one line each in the code they observe) -------------------------------------------
@_quiet
def event_ingested(event_type: str, outcome: str) -> None:
    metrics().events_ingested.labels(event_type, outcome).inc()


@_quiet
def dead_lettered(code: str) -> None:
    metrics().dead_letters.labels(code).inc()
    metrics().events_ingested.labels("invalid", "dead_lettered").inc()


@_quiet
def event_applied(event_type: str, outcome: str) -> None:
    metrics().events_applied.labels(event_type, outcome).inc()


@_quiet
def image_finished(status: str, failure_code: str, seconds: float) -> None:
    metrics().images.labels(status, failure_code).inc()
    metrics().image_seconds.labels(status).observe(seconds)
    refresh_gpu_memory()


@_quiet
def steps_ran(runs: Iterable[tuple[str, str, str, float]]) -> None:
    """(step, model version, status, duration in ms) of each step run on one image."""
    for step, version, status, duration_ms in runs:
        metrics().steps.labels(step, version, status).observe(duration_ms / 1000.0)


@_quiet
def batch_ran(model: str, size: int) -> None:
    metrics().batch_size.labels(model).observe(size)


@_quiet
def http_answered(method: str, route: str, status: int, seconds: float) -> None:
    metrics().http_requests.labels(method, route, str(status)).inc()
    metrics().http_seconds.labels(route).observe(seconds)


@contextlib.contextmanager
def image_in_flight() -> Iterator[None]:
    gauge = _quiet(lambda: metrics().in_flight)()
    if gauge is not None:
        gauge.inc()
    try:
        yield
    finally:
        if gauge is not None:
            gauge.dec()


@_quiet
def refresh_gpu_memory() -> None:
    """CUDA memory of this process, when it already uses CUDA. Never imports torch or
    initialises CUDA (a Celery parent must not, before it forks)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        metrics().gpu_memory.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
        metrics().gpu_memory.labels(device, "reserved").set(torch.cuda.memory_reserved(index))


# --- multiprocess mode and serving ---------------------------------------------------------------
def prepare_multiprocess(root: Path, family: str) -> Path:
    """Make this process (and the children it forks) write metrics to a fresh directory
    ``root/<family>-<pid>``, and remove the directories of earlier processes that are gone.
    Call before the process forks and before any metric is used."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{family}-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"{family}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    import prometheus_client.values as values

    values.ValueClass = values.get_value_class()  # in case prometheus_client was imported already
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_process_dead(pid: int | None = None) -> None:
    """Drop the live gauges of a pool process that exits (``worker_process_shutdown``)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def install_celery_hooks() -> None:
    from celery.signals import worker_process_shutdown

    worker_process_shutdown.connect(_child_exits, weak=False)


def _child_exits(pid: int | None = None, **_kwargs: Any) -> None:
    with contextlib.suppress(Exception):
        mark_process_dead(pid)


def registry(extra: Sequence[Any] = ()) -> Any:
    """The registry to expose: every process's values in multiprocess mode, else this
    process's own; plus ``extra`` collectors."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if not os.environ.get(MULTIPROC_ENV):
        if not extra:
            return REGISTRY
        reg = CollectorRegistry()
        reg.register(_ProcessValues(REGISTRY))
        for collector in extra:
            reg.register(collector)
        return reg
    reg = CollectorRegistry()
    reg.register(_DeadProcesses(os.environ[MULTIPROC_ENV]))  # first: prunes before the values are read
    MultiProcessCollector(reg)
    for collector in extra:
        reg.register(collector)
    return reg


class _DeadProcesses:
    """Drops the live gauges (in flight, GPU memory) of pool processes that died without
    saying so (SIGKILL, the OOM killer), at each scrape, before the values are summed."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client import multiprocess

        for file in self.path.glob("gauge_live*_*.db"):
            pid = file.stem.rpartition("_")[2]
            if pid.isdigit() and not _alive(int(pid)):
                multiprocess.mark_process_dead(int(pid), str(self.path))
        return iter(())


class _ProcessValues:
    """This process's own registry as one collector of another registry."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from self.source.collect()


def serve(port: int, extra: Sequence[Any] = (), addr: str = "0.0.0.0") -> None:
    """Serve /metrics on ``port`` from a daemon thread of this process."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr, registry=registry(extra))
    log.info("serving Prometheus metrics on port %d (/metrics)", port)


def exposition(extra: Sequence[Any] = ()) -> tuple[bytes, str]:
    """(body, content type) of a scrape, for a web framework's own /metrics route."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry(extra)), CONTENT_TYPE_LATEST


# --- backlog gauges, read on scrape -------------------------------------------------------------
class BacklogCollector:
    """Queue depth per Celery queue, and the events stream's length, pending entries and lag
    (entries the consumer group has not read yet), read when Prometheus scrapes: a handful
    of LLEN/XLEN/XINFO calls, bounded by a 2 s timeout."""

    def __init__(self, *, queues: Sequence[str], embedded_broker: bool, broker_url: str,
                 queue_dir: Path | None, redis_url: str | None, stream: str, group: str,
                 dead_letter_stream: str) -> None:
        self.queues = tuple(queues)
        self.embedded_broker = embedded_broker
        self.broker_url, self.queue_dir = broker_url, queue_dir
        self.redis_url, self.stream, self.group = redis_url, stream, group
        self.dead_letter_stream = dead_letter_stream
        self._clients: dict[str, Any] = {}

    def _client(self, url: str) -> Any:
        if url not in self._clients:
            import redis

            self._clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        return self._clients[url]

    def describe(self) -> list[Any]:
        return []  # read on scrape only: registering must not touch the servers

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        ok = GaugeMetricFamily("catalog_backlog_scrape_ok", "1 when the queue and stream gauges "
                               "could be read at this scrape, else 0 (see the process log).")
        good = True
        depth = GaugeMetricFamily("catalog_queue_depth", "Messages waiting in each Celery queue "
                                  "(not yet delivered to a worker).", labels=["queue"])
        try:
            for queue, count in self._queue_depths().items():
                depth.add_metric([queue], count)
        except Exception as exc:  # noqa: BLE001 - reported as catalog_backlog_scrape_ok 0
            log.warning("metrics: cannot read the queue depths: %s: %s", type(exc).__name__, exc)
            good = False
        yield depth
        if self.redis_url is not None:
            try:
                yield from self._stream_metrics()
            except Exception as exc:  # noqa: BLE001 - as above
                log.warning("metrics: cannot read the events stream: %s: %s", type(exc).__name__, exc)
                good = False
        ok.add_metric([], 1 if good else 0)
        yield ok

    def _queue_depths(self) -> dict[str, int]:
        if self.embedded_broker:
            folder = self.queue_dir
            names = [p.name for p in folder.glob("*.msg")] if folder and folder.exists() else []
            return {q: sum(n.endswith(f".{q}.msg") for n in names) for q in self.queues}
        pipe = self._client(self.broker_url).pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(queue)
        return dict(zip(self.queues, (int(n) for n in pipe.execute()), strict=True))

    def _stream_metrics(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        assert self.redis_url is not None
        client = self._client(self.redis_url)
        length = GaugeMetricFamily("catalog_stream_length", "Entries in a Redis stream (events, dead "
                                   "letters).", labels=["stream"])
        length.add_metric([self.stream], client.xlen(self.stream))
        length.add_metric([self.dead_letter_stream], client.xlen(self.dead_letter_stream))
        yield length
        lag = GaugeMetricFamily("catalog_stream_lag", "Entries of the events stream the consumer group "
                                "has not read yet (Redis 7 XINFO GROUPS lag).", labels=["stream", "group"])
        pending = GaugeMetricFamily("catalog_stream_pending", "Entries read by a `catalog ingest` and not "
                                    "acknowledged yet.", labels=["stream", "group"])
        groups = client.xinfo_groups(self.stream) if client.exists(self.stream) else []
        for info in groups:
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            if name != self.group:
                continue
            pending.add_metric([self.stream, name], int(info.get("pending") or 0))
            if info.get("lag") is not None:
                lag.add_metric([self.stream, name], int(info["lag"]))
        yield lag
        yield pending


def timer() -> Callable[[], float]:
    """Seconds since this call, as a function (``done = timer(); ...; done()``)."""
    started = time.perf_counter()
    return lambda: time.perf_counter() - started
