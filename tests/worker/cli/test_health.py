"""`catalog health {worker,ingest,beat,api}` (the container healthchecks of docker/compose.yaml):
exit 0 with one sentence when healthy, 1 with one sentence naming what is wrong. A worker that
answers is checked with a real worker process in tests/e2e/test_cpu_routing.py."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis as redis_lib
from click.testing import CliRunner, Result

from tests.support.services import REDIS_URL, TrackingRedis, unique
from worker.cli.main import main
from worker.config import load_settings, reset_settings
from worker.intake.ingest import StreamIngestor, heartbeat_key


def health(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str, **env: str) -> Result:
    for key, value in {"DATA_DIR": str(tmp_path / "data"), "STEPS": "metadata", **env}.items():
        monkeypatch.setenv(f"CATALOG_{key}", value)
    reset_settings()
    return CliRunner().invoke(main, ["health", *args])


def test_beat_is_healthy_while_it_writes_its_schedule(monkeypatch, tmp_path: Path) -> None:
    missing = health(monkeypatch, tmp_path, "beat")
    assert missing.exit_code == 1 and "beat-schedule does not exist" in missing.output
    schedule = tmp_path / "data" / "beat-schedule.db"  # shelve may add a suffix
    schedule.parent.mkdir(parents=True)
    schedule.write_bytes(b"x")
    fresh = health(monkeypatch, tmp_path, "beat")
    assert fresh.exit_code == 0 and fresh.output.startswith("healthy: beat wrote its schedule")
    old = time.time() - 1000
    os.utime(schedule, (old, old))
    stale = health(monkeypatch, tmp_path, "beat")
    assert stale.exit_code == 1 and "last written 1000 s ago (more than 900 s)" in stale.output
    assert health(monkeypatch, tmp_path, "beat", "--max-age", "2000").exit_code == 0


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_api_health_asks_healthz(monkeypatch, tmp_path: Path, api_server: str) -> None:
    ok = health(monkeypatch, tmp_path, "api", "--url", f"{api_server}/healthz")
    assert ok.exit_code == 0 and "answered 200" in ok.output
    bad = health(monkeypatch, tmp_path, "api", "--url", f"{api_server}/other")
    assert bad.exit_code == 1 and "answered HTTP 503" in bad.output
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = health(monkeypatch, tmp_path, "api", "--url", f"http://127.0.0.1:{port}/healthz", "--timeout", "2")
    assert down.exit_code == 1 and "cannot be reached" in down.output
    assert len(down.output.strip().splitlines()) == 1


def test_ingest_health_follows_the_heartbeat_of_the_ingest_loop(monkeypatch, tmp_path: Path,
                                                               redis_client: TrackingRedis) -> None:
    stream = unique("health-ev")
    env = {"REDIS_URL": REDIS_URL, "EVENTS_STREAM": stream}
    absent = health(monkeypatch, tmp_path, "ingest", **env)
    assert absent.exit_code == 1 and "has no heartbeat in Redis" in absent.output

    settings = load_settings(redis_url=REDIS_URL, events_stream=stream, data_dir=tmp_path / "data")
    ingestor = StreamIngestor(redis_client, settings, publish=lambda _event: None, consumer="c1", block_ms=100)
    loop = threading.Thread(target=ingestor.run, daemon=True)
    loop.start()
    key = heartbeat_key(stream, socket.gethostname())
    try:
        deadline = time.monotonic() + 30
        while not redis_client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < redis_client.ttl(key) <= 300
        alive = health(monkeypatch, tmp_path, "ingest", **env)
        assert alive.exit_code == 0 and alive.output.startswith("healthy: catalog ingest c1 reported")
    finally:
        ingestor.stop()
        loop.join(30)
    stopped = health(monkeypatch, tmp_path, "ingest", **env)  # a stopped ingest removes its heartbeat
    assert stopped.exit_code == 1 and "has no heartbeat" in stopped.output

    redis_client.set(key, json.dumps({"consumer": "c1", "at": time.time() - 500}))
    late = health(monkeypatch, tmp_path, "ingest", **env)
    assert late.exit_code == 1 and "last reported 500 s ago (more than 60 s)" in late.output


def test_ingest_health_with_redis_down_is_one_sentence(monkeypatch, tmp_path: Path) -> None:
    down = health(monkeypatch, tmp_path, "ingest", "--timeout", "1", REDIS_URL="redis://:s3cret@127.0.0.1:1/0")
    assert down.exit_code == 1 and "CATALOG_REDIS_URL" in down.output and "cannot be reached" in down.output
    assert "s3cret" not in down.output and len(down.output.strip().splitlines()) == 1


def test_worker_health_needs_an_answer(monkeypatch, tmp_path: Path) -> None:
    embedded = health(monkeypatch, tmp_path, "worker")
    assert embedded.exit_code == 1 and "CATALOG_BROKER_URL" in embedded.output
    node = f"{unique('nobody')}@{socket.gethostname()}"
    try:
        silent = health(monkeypatch, tmp_path, "worker", "--node", node, "--timeout", "0.5", BROKER_URL=REDIS_URL)
    finally:
        forget_reply_queue()
    assert silent.exit_code == 1 and f"worker {node} did not answer a ping within 0.5 s" in silent.output


def forget_reply_queue() -> None:
    """kombu schedules the expiry of Celery's remote-control reply queue in a key of its own;
    remove what this test's ping left there (the key goes once empty)."""
    client = redis_lib.Redis.from_url(REDIS_URL)
    client.zrem("_kombu.binding_deadlines", "reply.celery.pidbox")
    client.close()
