"""Run real `catalog` processes (worker, ingest) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CATALOG = [sys.executable, "-m", "worker.cli"]
ROOT = Path(__file__).resolve().parents[2]


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("ab")
        # A session of its own: SIGKILL reaches the Celery parent and its pool children.
        self.popen = subprocess.Popen([*CATALOG, *args], env=env, cwd=ROOT, stdout=self._fh,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def catalog_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CATALOG_") or k.startswith("CATALOG_TEST_")}
    env.update({f"CATALOG_{k.upper()}": v for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_catalog(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CATALOG, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, procs: Sequence[Proc] = ()) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{what}: process exited early:\n{proc.output()[-4000:]}")
        time.sleep(0.3)
    logs = "\n".join(p.output()[-4000:] for p in procs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
