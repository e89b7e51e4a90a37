"""`catalog health {worker,ingest,beat,api}`: is the long-running process on this host alive?

Made for container healthchecks (docker/compose.yaml): each check prints one sentence and
exits 0 when healthy, 1 when not. Every check has a deadline, so a hung server makes the check
fail instead of hang.

* worker: a Celery ``ping`` to this host's worker node (``celery@<hostname>``), which its main
  process answers even while every pool slot is busy with a long image.
* ingest: the heartbeat key the ingest loop refreshes in Redis every
  :data:`~worker.intake.ingest.HEARTBEAT_INTERVAL_S` seconds while it reads the stream
  (``<CATALOG_EVENTS_STREAM>:heartbeat:<hostname>``); an ingest stuck on an unreachable Redis
  stops refreshing it.
* beat: the age of beat's schedule file, which beat saves after sending a task once 3 minutes
  passed since the last save; the stale sweep goes out every 5 minutes, so a running beat
  writes it at least every 5 minutes.
* api: ``GET /healthz``.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from worker.cli.common import cli_settings
from worker.config import ENV_PREFIX, Settings, redact_url


@click.group("health")
def health() -> None:
    """Exit 0 when a long-running process on this host is healthy, 1 when not, with one sentence.

    \b
    catalog health worker   # the Celery worker node celery@<hostname> answers a ping
    catalog health ingest   # catalog ingest refreshed its heartbeat in Redis recently
    catalog health beat     # beat's schedule file was written recently
    catalog health api      # GET http://127.0.0.1:8080/healthz answers 200
    """


def _unhealthy(sentence: str) -> click.ClickException:
    return click.ClickException(f"unhealthy: {sentence}")


def _redis_or_fail(url: str, variable: str, timeout: float):  # -> redis.Redis
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise _unhealthy(f"Redis at {redact_url(url)} ({variable}) cannot be reached: "
                         f"{type(exc).__name__}: {exc}") from None
    return client


@health.command("worker")
@click.option("--node", default=None, help="Celery node name to ping. Default: celery@<this host's name>, "
              "the name `catalog worker` takes unless given -n.")
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=5.0, show_default=True,
              help="Seconds to wait for the answer.")
def worker_health(node: str | None, timeout: float) -> None:
    """The worker on this host answers a Celery ping (Redis broker)."""
    settings = cli_settings()
    node = node or f"celery@{socket.gethostname()}"
    if settings.embedded_broker:
        raise _unhealthy(f"the filesystem broker has no remote control, so {node} cannot be pinged: "
                         f"set {ENV_PREFIX}BROKER_URL to a Redis URL")
    _redis_or_fail(settings.effective_broker_url, f"{ENV_PREFIX}BROKER_URL", timeout)
    from worker.celery_app import make_celery

    app = make_celery(settings)
    try:
        replies = app.control.ping(destination=[node], timeout=timeout) or []
    finally:
        app.close()
    if not any(node in reply for reply in replies):
        raise _unhealthy(f"worker {node} did not answer a ping within {timeout:g} s")
    click.echo(f"healthy: worker {node} answered a ping")


@health.command("ingest")
@click.option("--max-age", type=click.FloatRange(1), default=60.0, show_default=True,
              help="Oldest heartbeat, seconds, that still counts as alive.")
@click.option("--host", default=None, help="Host whose catalog ingest to check. Default: this one.")
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=5.0, show_default=True,
              help="Seconds to wait for Redis.")
def ingest_health(max_age: float, host: str | None, timeout: float) -> None:
    """catalog ingest on this host refreshed its heartbeat in Redis within --max-age seconds."""
    from worker.intake.ingest import heartbeat_key

    settings = cli_settings()
    host = host or socket.gethostname()
    key = heartbeat_key(settings.events_stream, host)
    raw = _redis_or_fail(settings.effective_redis_url, f"{ENV_PREFIX}REDIS_URL", timeout).get(key)
    if raw is None:
        raise _unhealthy(f"catalog ingest on {host} has no heartbeat in Redis (key {key}): "
                         "it is not running, or cannot reach Redis")
    try:
        beat = json.loads(raw)
        age = time.time() - float(beat["at"])
    except (ValueError, KeyError, TypeError):
        raise _unhealthy(f"the heartbeat key {key} holds something else than a heartbeat") from None
    if age > max_age:
        raise _unhealthy(f"catalog ingest on {host} last reported {age:.0f} s ago (more than {max_age:g} s)")
    click.echo(f"healthy: catalog ingest {beat.get('consumer', host)} reported {age:.0f} s ago")


def _default_schedule(settings: Settings) -> Path:
    return settings.data_dir / "beat-schedule"  # what `catalog beat` uses without --schedule


@health.command("beat")
@click.option("--schedule", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Beat's schedule file. Default: <data_dir>/beat-schedule, as `catalog beat` uses.")
@click.option("--max-age", type=click.FloatRange(1), default=900.0, show_default=True,
              help="Oldest write of the schedule, seconds: a running beat saves it at least every "
              "300 s (after sending the stale sweep), so keep this well above 300.")
def beat_health(schedule: Path | None, max_age: float) -> None:
    """catalog beat wrote its schedule file within --max-age seconds."""
    path = schedule or _default_schedule(cli_settings())
    # shelve's dbm backend may add a suffix (.db, .dat/.dir/.bak): the newest file counts.
    files = [p for p in path.parent.glob(path.name + "*") if p.is_file()] if path.parent.is_dir() else []
    if not files:
        raise _unhealthy(f"beat's schedule file {path} does not exist: catalog beat has not started "
                         "(or uses another --schedule)")
    age = time.time() - max(p.stat().st_mtime for p in files)
    if age > max_age:
        raise _unhealthy(f"beat's schedule file {path} was last written {age:.0f} s ago (more than {max_age:g} s)")
    click.echo(f"healthy: beat wrote its schedule {age:.0f} s ago")


@health.command("api")
@click.option("--url", default="http://127.0.0.1:8080/healthz", show_default=True,
              help="The review service's health URL.")
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=5.0, show_default=True,
              help="Seconds to wait for the answer.")
def api_health(url: str, timeout: float) -> None:
    """The review service answers GET /healthz with 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            code = response.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _unhealthy(f"the review service at {url} cannot be reached: {reason}") from None
    if code != 200:
        raise _unhealthy(f"the review service at {url} answered HTTP {code}")
    click.echo(f"healthy: the review service at {url} answered 200")
