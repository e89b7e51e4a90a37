"""The real processes of one scenario, wired to the suite's own servers.

Every process is the ``catalog`` command of the installed project (the same entry point an
operator runs), started in a session of its own so that a SIGKILL reaches a Celery parent
and its pool children alike, with its output in a log file of the scenario. Settings are
the defaults except what wires the processes to the suite's servers and keeps the machine
light (``CATALOG_STEPS=metadata``, ``CATALOG_DEVICE=cpu``); ``overrides`` may change any.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.faultkit.images import ImageHost
from bench.faultkit.servers import PostgresServer, RedisServer

ROOT = Path(__file__).resolve().parents[2]
QUEUES = "ingest,gpu,cpu"


def catalog_command() -> list[str]:
    """The venv's ``catalog`` script next to this interpreter (``python -m worker.cli`` if the
    project is not installed with its scripts)."""
    script = Path(sys.executable).with_name("catalog")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]


class Proc:
    """One ``catalog`` process; its process group id is its pid."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.started = time.monotonic()
        self.retired = False  # killed or stopped on purpose: not to be restarted
        with log.open("ab") as fh:
            self.popen = subprocess.Popen([*catalog_command(), *args], env=env, cwd=ROOT, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole process group (a Celery parent and its pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        # Whatever is left of the group (an orphaned pool child) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Deployment:
    """A fresh database on the suite's Postgres, an emptied Redis, a data directory, and the
    processes of one scenario."""

    def __init__(self, name: str, workdir: Path, pg: PostgresServer, redis_server: RedisServer,
                 host: ImageHost, overrides: dict[str, str] | None = None) -> None:
        self.name = name
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pg = pg
        self.redis_server = redis_server
        self.host = host
        self.database = f"faults_{name}"
        self.procs: list[Proc] = []
        self.exits: list[str] = []  # processes that ended without being told to
        pg.create_database(self.database)
        client = redis_server.client()
        try:
            client.flushall()
        finally:
            client.close()
        values = {
            "DATABASE_URL": pg.url(self.database),
            "BROKER_URL": redis_server.url(0),
            "REDIS_URL": redis_server.url(0),
            "DATA_DIR": str(self.dir / "data"),
            "STEPS": "metadata",
            "DEVICE": "cpu",
            "FETCH_ALLOW_HOSTS": host.allow_entry,
            "LOG_LEVEL": "INFO",
        }
        values.update({k.upper().removeprefix("CATALOG_"): v for k, v in (overrides or {}).items()})
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CATALOG_")}
        self.env.update({f"CATALOG_{k}": v for k, v in values.items()})
        self.env["PYTHONUNBUFFERED"] = "1"
        # The processes run the source tree this harness lives in, also when the venv's
        # editable install points at another checkout.
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.settings = values

    # --- commands ---------------------------------------------------------------------------
    def catalog(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*catalog_command(), *args], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def upgrade(self) -> None:
        done = self.catalog("db", "upgrade")
        if done.returncode != 0:
            raise RuntimeError(f"catalog db upgrade failed:\n{done.stdout}\n{done.stderr}")

    def start(self, role: str, *args: str) -> Proc:
        index = sum(p.name.startswith(role) for p in self.procs) + 1
        proc = Proc(f"{role}-{index}", list(args), self.env, self.dir / f"{role}-{index}.log")
        self.procs.append(proc)
        return proc

    def start_worker(self, wait: bool = True) -> Proc:
        index = sum(p.name.startswith("worker") for p in self.procs) + 1
        proc = self.start("worker", "worker", "-Q", QUEUES, "-c", "2", "-n", f"faults{index}@%h")
        self.host.allow_kill(proc.pgid)  # a crashing image may kill its pool children
        if wait:
            self.wait_log(proc, " ready.", 120)
        return proc

    def start_ingest(self, wait: bool = True) -> Proc:
        proc = self.start("ingest", "ingest")
        if wait:
            self.wait_log(proc, "ingest: stream=", 60)
        return proc

    def start_beat(self, wait: bool = False) -> Proc:
        return self.start("beat", "beat")

    def wait_log(self, proc: Proc, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in proc.output():
                return
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.output()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"{proc.name} did not log {marker!r} within {timeout}s:\n{proc.output()[-3000:]}")

    def supervise(self) -> None:
        """Restart a process that ended on its own, like systemd or Kubernetes would, and
        remember it: an exit nobody asked for is a finding."""
        for proc in list(self.procs):
            if proc.alive() or proc.retired:
                continue
            proc.retired = True
            self.exits.append(f"{proc.name} exited with {proc.popen.returncode}")
            role = proc.name.rsplit("-", 1)[0]
            starter: Callable[..., Proc] = {"worker": self.start_worker, "ingest": self.start_ingest,
                                            "beat": self.start_beat}[role]
            starter(wait=False)

    def retire(self, proc: Proc) -> None:
        """Mark a process the scenario killed on purpose, so supervise() leaves it dead."""
        proc.retired = True

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.retire(proc)
            proc.stop()

    def logs(self) -> dict[str, str]:
        return {proc.name: proc.output() for proc in self.procs}
