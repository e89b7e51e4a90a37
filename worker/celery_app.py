"""The Celery application. Policy lives here and in tasks/base.py, not in each task.

Settings chosen for long GPU tasks: a task is acknowledged only after it finished
(``acks_late``) and requeued if its worker process dies (``reject_on_worker_lost``); each
worker process reserves one message at a time (``prefetch_multiplier=1``) so a slow task does
not hold others hostage; Redis redelivers an unacknowledged message only after
``visibility_timeout``, which must stay above the longest task. A killed worker's images do not
wait for that: each carries a lease its run renews, and every worker re-queues the images whose
lease ran out (``worker.pipeline.lease``, started on ``worker_ready`` in ``tasks.maintenance``).
Results go to the database, so there is no result backend.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init
from kombu import Exchange, Queue

from worker.config import Settings, get_settings

QUEUES = ("ingest", "gpu", "cpu", "train")

#: Task names other layers publish by name (they never import tasks/).
HANDLE_EVENT_TASK = "tasks.events.handle_event"
ANALYZE_IMAGE_TASK = "tasks.images.analyze_image"
#: Several images of one event in one message (CATALOG_IMAGES_PER_TASK); same queue and policy.
ANALYZE_IMAGES_TASK = "tasks.images.analyze_images"
REQUEUE_STALE_TASK = "tasks.maintenance.requeue_stale_images"
RETRAIN_TASK = "tasks.training.retrain"
#: Outbound events (worker/outbound): publish the outbox, POST one event to the webhook.
RELAY_OUTBOX_TASK = "tasks.outbound.relay_outbox"
DELIVER_WEBHOOK_TASK = "tasks.outbound.deliver_webhook"

ROUTES = {
    "tasks.events.*": {"queue": "ingest"},
    "tasks.images.*": {"queue": "gpu"},
    "tasks.maintenance.*": {"queue": "cpu"},
    "tasks.training.*": {"queue": "train"},
    "tasks.outbound.*": {"queue": "cpu"},
}

#: The queue image analysis goes to. Its name is historical (and public: deployments name it in
#: ``-Q``): it is the image queue on every host, and a CPU-only deployment must consume it too.
IMAGES_QUEUE = "gpu"

#: Names ``catalog worker -Q`` accepts besides the queues themselves: ``images`` reads right on
#: CPU-only hosts, where image tasks still travel on the ``gpu`` queue.
QUEUE_ALIASES = {"images": (IMAGES_QUEUE,)}


def routed_queues() -> list[str]:
    """Every queue some task is routed to: each needs a consumer in a deployment."""
    return sorted({route["queue"] for route in ROUTES.values()}, key=QUEUES.index)


def expand_queues(text: str) -> list[str]:
    """The queues a ``-Q`` value names, aliases expanded, duplicates dropped, in order.

    Raises ValueError naming an unknown queue: a worker on a queue no task is routed to
    would sit idle while the work it was meant for waits."""
    out: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        if name not in QUEUES and name not in QUEUE_ALIASES:
            known = ", ".join([*QUEUES, *(f"{a} (= {','.join(q)})" for a, q in QUEUE_ALIASES.items())])
            raise ValueError(f"unknown queue {name!r}; the queues are {known}")
        for queue in QUEUE_ALIASES.get(name, (name,)):
            if queue not in out:
                out.append(queue)
    if not out:
        raise ValueError("no queue named")
    return out


def make_celery(settings: Settings) -> Celery:
    app = Celery("catalog", include=["tasks.events", "tasks.images", "tasks.maintenance", "tasks.training",
                                         "tasks.outbound"])
    broker_options: dict[str, object] = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.restore_sweep_seconds,
        "unacked_restore_throttle": 1,
    }
    embedded = settings.embedded_broker
    if embedded:
        folder = settings.broker_dir
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        broker_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    app.conf.update(
        broker_url=settings.effective_broker_url,
        broker_transport_options=broker_options,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_routes=ROUTES,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(settings.task_time_limit - 30, int(settings.task_time_limit * 0.8)),
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=None,
        worker_hijack_root_logger=False,
        # The filesystem transport has no fan-out exchange, so remote control is off there.
        worker_enable_remote_control=not embedded,
        worker_send_task_events=False,
        timezone="UTC",
        beat_schedule={
            "requeue-stale-images": {
                "task": REQUEUE_STALE_TASK,
                "schedule": 300.0,
            },
            # Outbound events the task right after their commit could not publish (Redis down,
            # a killed worker, verdicts from the review service or the CLI); also prunes old rows.
            "relay-outbox": {"task": RELAY_OUTBOX_TASK, "schedule": 15.0},
            **retrain_schedule(settings),
        },
    )
    return app


def retrain_schedule(settings: Settings) -> dict[str, dict[str, object]]:
    """The beat entry of the periodic retrain (CATALOG_RETRAIN_SCHEDULE, a crontab line; empty:
    none). Two beats sending it twice is harmless: the retrain runs under a lock and the
    second one finds it held and does nothing."""
    line = settings.retrain_schedule.strip()
    if not line:
        return {}
    from celery.schedules import crontab

    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"CATALOG_RETRAIN_SCHEDULE {line!r}: expected 5 crontab fields "
                         "(minute hour day-of-month month day-of-week)")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    schedule = crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                       day_of_week=day_of_week)
    return {"retrain": {"task": RETRAIN_TASK, "schedule": schedule}}


@worker_process_init.connect
def _fresh_process(**_kwargs: object) -> None:
    # A forked child must not reuse the parent's database sockets.
    from db.session import dispose_engines

    dispose_engines()


app = make_celery(get_settings())
