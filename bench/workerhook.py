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
    _sample_dump()


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


#: With BENCH_SAMPLE_DIR set, each pool process is sampled instead: SIGPROF every
#: SAMPLE_INTERVAL s of the process's CPU time records the main thread's stack, and
#: ``<pid>.samples.json`` ({"interval_s", "stacks": {"file:line(func);...": CPU seconds}}) is
#: written like the profile. Each sample is weighted by the process CPU time since the previous
#: one (timer expirations during a long C call coalesce into one signal, handled when the call
#: returns to its Python caller). Unlike cProfile this does not inflate code made of many small
#: Python calls (SQLAlchemy, Celery), so the shares are those of an unprofiled run.
SAMPLE_INTERVAL = 0.001
_samples: dict[int, dict[str, float]] = {}
_last_sample = [0.0]


def _sample(_signum: int, frame: Any) -> None:
    now = time.process_time()
    spent, _last_sample[0] = now - _last_sample[0], now
    parts = []
    while frame is not None:
        code = frame.f_code
        parts.append(f"{code.co_filename}:{code.co_firstlineno}({code.co_name})")
        frame = frame.f_back
    key = ";".join(reversed(parts))
    stacks = _samples.setdefault(os.getpid(), {})
    stacks[key] = stacks.get(key, 0.0) + spent


def _sample_start(**_: Any) -> None:
    if os.environ.get("BENCH_SAMPLE_DIR"):
        import signal

        _samples[os.getpid()] = {}
        _last_sample[0] = time.process_time()
        signal.signal(signal.SIGPROF, _sample)
        signal.setitimer(signal.ITIMER_PROF, SAMPLE_INTERVAL, SAMPLE_INTERVAL)


def _sample_dump(final: bool = False) -> None:
    stacks = _samples.get(os.getpid())
    if stacks is None:
        return
    if final or _dump.tasks.get(os.getpid(), 0) % PROFILE_EVERY == 0:  # type: ignore[attr-defined]
        path = Path(os.environ["BENCH_SAMPLE_DIR"]) / f"{os.getpid()}.samples.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"interval_s": SAMPLE_INTERVAL, "stacks": dict(stacks)}))
        tmp.replace(path)


def summarise_samples(path: Path, top: int = 40, focus: str | None = None) -> list[tuple[str, float]]:
    """Inclusive share (%) of the sampled CPU time per function in a ``.samples.json`` file, largest
    first (``focus``: only stacks through a function whose name contains it)."""
    data = json.loads(Path(path).read_text())
    stacks = {k: v for k, v in data["stacks"].items() if focus is None or focus in k}
    total = sum(data["stacks"].values()) or 1
    inclusive: dict[str, float] = {}
    for key, count in stacks.items():
        for name in set(key.split(";")):
            inclusive[name] = inclusive.get(name, 0) + count
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return [(name, round(100 * count / total, 1)) for name, count in ranked]


def main() -> None:
    from celery.signals import task_postrun, worker_process_init, worker_process_shutdown

    install_meter()
    task_postrun.connect(_dump, weak=False)
    worker_process_init.connect(_profile_start, weak=False)
    worker_process_init.connect(_sample_start, weak=False)
    worker_process_shutdown.connect(lambda **_: _profile_dump(final=True), weak=False)
    worker_process_shutdown.connect(lambda **_: _sample_dump(final=True), weak=False)
    from worker.cli.main import main as catalog

    catalog(prog_name="catalog")


if __name__ == "__main__":
    main()
