"""What `catalog worker` and `catalog ingest` switch on at start-up: the configured log format
in Celery's loggers and pool children, task events for Flower, and /metrics
(CATALOG_METRICS_PORT) served by the parent process for itself and its pool children."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from worker.config import Settings
from worker.observe import logs, metrics

log = logging.getLogger("catalog")


def backlog_collector(settings: Settings, queues: Sequence[str]) -> metrics.BacklogCollector:
    redis_url = settings.effective_redis_url
    return metrics.BacklogCollector(
        queues=queues, embedded_broker=settings.embedded_broker, broker_url=settings.effective_broker_url,
        queue_dir=settings.broker_dir / "queue",
        redis_url=redis_url if redis_url.startswith(("redis://", "rediss://", "unix://")) else None,
        stream=settings.events_stream, group=settings.events_group,
        dead_letter_stream=settings.dead_letter_stream)


def start_metrics(settings: Settings, family: str, queues: Sequence[str]) -> None:
    """With CATALOG_METRICS_PORT set: multiprocess mode in a fresh directory under
    CATALOG_METRICS_DIR, and /metrics on that port (call before the process forks)."""
    if not settings.metrics_port:
        return
    metrics.prepare_multiprocess(settings.effective_metrics_dir, family)
    metrics.serve(settings.metrics_port, extra=[backlog_collector(settings, queues)])


def worker_arguments(settings: Settings, args: list[str], queues: Sequence[str]) -> list[str]:
    """The `celery` command line for ``catalog worker``: global options, ``worker``, then
    ``args`` plus task events. Also keeps the log format in pool children, drops the live
    gauges of pool processes that exit, and starts the metrics server."""
    metrics.install_celery_hooks()
    start_metrics(settings, "worker", queues)
    if settings.worker_task_events and not settings.embedded_broker and not (
            {"-E", "--task-events"} & set(args)):
        # What Flower shows. The filesystem broker of the embedded mode has no event exchange.
        args = [*args, "--task-events"]
    return logs.celery_arguments(settings.log_format, "worker", args)
