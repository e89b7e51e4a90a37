"""``python -m bench.workerhook worker ...``: ``catalog`` with the bench's forward meter installed,
so an end-to-end run can say how much of each worker process's time was model forwards.

The meter is installed in the Celery parent before it forks, so every pool child inherits it.
After each task a child writes its cumulative figures (tasks, process CPU seconds, wall and CPU
seconds inside forwards) to ``$BENCH_STATS_DIR/<pid>.json`` (atomically). Nothing else changes:
this is the real ``catalog`` command.
"""

from __future__ import annotations

import cProfile
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import METER, install_meter


def _dump(**_: Any) -> None:
    folder = os.environ.get("BENCH_STATS_DIR")
    if not folder:
        return
    path = Path(folder) / f"{os.getpid()}.json"
    stats = {"pid": os.getpid(), "cpu_s": time.process_time(), "forward_calls": METER.total.calls,
             "forward_wall_s": METER.total.wall, "forward_cpu_s": METER.total.cpu,
             "tasks": _dump.tasks.get(os.getpid(), 0) + 1}  # type: ignore[attr-defined]
    _dump.tasks[os.getpid()] = stats["tasks"]  # type: ignore[attr-defined]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)
    _profile_dump()


_dump.tasks = {}  # type: ignore[attr-defined]

#: With BENCH_PROFILE_DIR set, each pool process runs under cProfile and writes
#: ``<pid>.prof`` (cumulative) every PROFILE_EVERY tasks and when it shuts down.
PROFILE_EVERY = 25
_profiles: dict[int, cProfile.Profile] = {}


def _profile_start(**_: Any) -> None:
    if os.environ.get("BENCH_PROFILE_DIR"):
        # CPU time of this process (not wall time: the machine is shared, waits are not work)
        profile = _profiles[os.getpid()] = cProfile.Profile(time.process_time)
        profile.enable()


def _profile_dump(final: bool = False) -> None:
    profile = _profiles.get(os.getpid())
    if profile is None:
        return
    if final or _dump.tasks.get(os.getpid(), 0) % PROFILE_EVERY == 0:  # type: ignore[attr-defined]
        profile.disable()
        profile.dump_stats(str(Path(os.environ["BENCH_PROFILE_DIR"]) / f"{os.getpid()}.prof"))
        profile.enable()


def main() -> None:
    from celery.signals import task_postrun, worker_process_init, worker_process_shutdown

    install_meter()
    task_postrun.connect(_dump, weak=False)
    worker_process_init.connect(_profile_start, weak=False)
    worker_process_shutdown.connect(lambda **_: _profile_dump(final=True), weak=False)
    from worker.cli.main import main as catalog

    catalog(prog_name="catalog")


if __name__ == "__main__":
    main()
