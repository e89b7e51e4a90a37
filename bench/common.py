"""What every part of ``python -m bench`` shares: the machine description, load averages, the
photos, the scratch servers, and the meter that times model forwards.

The meter is how "model time" and "non-model time" are told apart without editing the worker:
every concrete :class:`worker.models.backends.Backend` subclass gets its ``forward`` wrapped
(in this process only; :mod:`bench.workerhook` does the same inside worker processes), and the
wrapper adds the wall time and the *process* CPU time spent inside it. Steps run one after the
other on one thread when batching is off (the CPU default), so process CPU time during a
forward is the forward's own CPU time, its intra-op threads included.
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import platform
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

PG_ADMIN = os.environ.get("BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_BASE = os.environ.get("BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432")
#: The bench's own Redis database: the Celery broker keys have fixed names, so the bench flushes
#: this database before and after each run (and refuses a database another live bench holds).
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
LOCK_KEY = "catalog-bench:owner"

# --------------------------------------------------------------------------- the machine


def load1() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Cores, CPU model, library versions, GPU (when torch sees one), date."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    try:
        import PIL

        info["pillow"] = PIL.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (f"{info['date']}; {info['host_cores']} cores ({info['cpu']}){gpu}; Python {info['python']}, "
            f"torch {info['torch']}, onnxruntime {info.get('onnxruntime')}, Pillow {info.get('pillow')}")


# --------------------------------------------------------------------------- photos

#: Real photos from installed packages (scikit-image, scikit-learn, Debian darknet).
DARKNET = Path("/usr/share/darknet/data")


def base_photos(limit: int = 100) -> list[tuple[str, Image.Image]]:
    """Up to ``limit`` real photos, the scikit-image ones first."""
    from skimage import data

    photos = [(name, Image.fromarray(getattr(data, name)()).convert("RGB"))
              for name in ("astronaut", "coffee", "chelsea", "rocket")[:limit]]
    if len(photos) >= limit:
        return photos
    try:
        from sklearn.datasets import load_sample_images

        for name, array in zip(("china", "flower"), load_sample_images().images, strict=True):
            photos.append((name, Image.fromarray(array).convert("RGB")))
    except ImportError:  # the bench extra is not installed: the scikit-image photos suffice
        pass
    if DARKNET.is_dir():
        for path in sorted(DARKNET.glob("*.jpg")):
            with Image.open(path) as img:
                photos.append((path.stem, img.convert("RGB")))
    return photos


def write_photos(folder: Path, n: int, megapixels: float = 1.0, quality: int = 90) -> list[str]:
    """``n`` JPEG files of about ``megapixels`` MP each (quality ``quality``), cycling through the
    real photos; each file differs slightly (a few pixels cropped) so no two have the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    sized = []
    for name, img in base_photos(n):
        scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
        sized.append((name, img.resize((round(img.width * scale), round(img.height * scale)),
                                       Image.Resampling.LANCZOS)))
    out = []
    for i in range(n):
        name, img = sized[i % len(sized)]
        k = i // len(sized)
        crop = img.crop((k % 7, k % 5, img.width - (k % 3), img.height - (k % 4))) if k else img
        path = folder / f"{i:04d}-{name}.jpg"
        crop.save(path, quality=quality)
        out.append(str(path))
    return out


def photo_sizes(paths: list[str]) -> str:
    sizes = []
    for p in paths:
        with Image.open(p) as img:
            sizes.append(img.width * img.height)
    return f"{min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f} MP JPEG q90"


# --------------------------------------------------------------------------- the forward meter


@dataclass
class Tally:
    calls: int = 0
    wall: float = 0.0
    cpu: float = 0.0

    def add(self, wall: float, cpu: float) -> None:
        self.calls += 1
        self.wall += wall
        self.cpu += cpu


@dataclass
class ForwardMeter:
    """Time inside every model forward of this process, in total and per label (the step that
    is running, see :meth:`label`)."""

    total: Tally = field(default_factory=Tally)
    by_label: dict[str, Tally] = field(default_factory=dict)
    profiler: cProfile.Profile | None = None
    _label: str = "-"
    _local: threading.local = field(default_factory=threading.local)

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        previous, self._label = self._label, name
        try:
            yield
        finally:
            self._label = previous

    def reset(self) -> None:
        self.total = Tally()
        self.by_label = {}

    def wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        meter = self

        def timed_forward(backend: Any, batch: Any) -> Any:
            if getattr(meter._local, "inside", False):  # a backend calling another: count once
                return forward(backend, batch)
            meter._local.inside = True
            profiler = meter.profiler
            if profiler is not None:
                profiler.disable()  # the profile shows what is NOT model time
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return forward(backend, batch)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                meter.total.add(wall, cpu)
                meter.by_label.setdefault(meter._label, Tally()).add(wall, cpu)
                meter._local.inside = False
                if profiler is not None:
                    profiler.enable()

        timed_forward.__wrapped__ = forward  # type: ignore[attr-defined]
        return timed_forward


METER = ForwardMeter()


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def import_steps() -> None:
    """Import every registered step module (so every Backend subclass exists)."""
    import importlib

    from worker.pipeline.registry import STEP_REGISTRY

    for target in STEP_REGISTRY.values():
        importlib.import_module(target.partition(":")[0])


def install_meter(meter: ForwardMeter = METER) -> ForwardMeter:
    """Wrap ``forward`` of every Backend class (idempotent). Call after :func:`import_steps`."""
    from worker.models.backends import Backend

    import_steps()
    for cls in [Backend, *_subclasses(Backend)]:
        own = cls.__dict__.get("forward")
        if own is None or getattr(own, "__isabstractmethod__", False) or hasattr(own, "__wrapped__"):
            continue
        setattr(cls, "forward", meter.wrap(own))  # noqa: B010 - a class attribute set on purpose
    return meter


#: step name -> wall and process CPU time of its ``run`` (filled by the wrappers of label_steps)
STEP_TALLIES: dict[str, Tally] = {}


def label_steps(meter: ForwardMeter = METER) -> dict[str, Tally]:
    """Wrap every step instance's ``run`` so forwards are counted per step, and time each step
    (wall and process CPU). Returns the per-step tallies (filled as steps run)."""
    from worker.pipeline.registry import STEP_REGISTRY, get_step

    tallies = STEP_TALLIES  # one dict: a step instance is wrapped once per process
    for name in STEP_REGISTRY:
        step = get_step(name)
        run = type(step).run
        if getattr(step, "_bench_wrapped", False):
            continue

        def timed_run(ctx: Any, _run: Any = run, _step: Any = step, _name: str = name) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                with meter.label(_name):
                    return _run(_step, ctx)
            finally:
                tallies.setdefault(_name, Tally()).add(time.perf_counter() - wall, time.process_time() - cpu)

        step.run = timed_run  # type: ignore[method-assign]
        step._bench_wrapped = True  # type: ignore[attr-defined]
    return tallies


# --------------------------------------------------------------------------- servers


def pg_admin(sql: str) -> list[tuple[Any, ...]]:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def postgres_available() -> str | None:
    """None when the bench's Postgres answers, else why not."""
    try:
        pg_admin("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means: not available, say why
        return f"Postgres at {PG_ADMIN!r} not reachable: {type(exc).__name__}: {str(exc).strip()[:120]}"
    return None


def redis_available(url: str | None = None) -> str | None:
    import redis

    url = url or REDIS_URL
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: not available, say why
        return f"Redis at {url} not reachable: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def scratch_database(prefix: str = "catalog_bench") -> Iterator[str]:
    """A migrated Postgres database for one measurement, dropped afterwards."""
    from db.migrate import upgrade
    from db.session import dispose_engines

    _drop_orphans()
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    url = f"{PG_BASE}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        dispose_engines()
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_SCRATCH = re.compile(r"^catalog_bench_[a-z0-9]+_(\d+)_[0-9a-f]{6}$")


def _drop_orphans() -> None:
    """Drop scratch databases of bench processes that are gone (a run killed hard)."""
    for (name,) in pg_admin("SELECT datname FROM pg_database"):
        match = _SCRATCH.match(name)
        if match and not _pid_alive(int(match.group(1))):
            pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def bench_redis(url: str | None = None) -> Iterator[Any]:
    """The bench's Redis database, flushed before and after; refuses one another live bench
    process holds (a killed run's lock is taken over)."""
    import redis

    url = url or REDIS_URL
    r = redis.Redis.from_url(url)
    owner = r.get(LOCK_KEY)
    if owner is not None and int(owner) != os.getpid() and _pid_alive(int(owner)):
        raise RuntimeError(f"Redis {url} is in use by bench process {int(owner)}; set BENCH_REDIS_URL "
                           "to another database")
    r.flushdb()
    r.set(LOCK_KEY, os.getpid())
    try:
        yield r
    finally:
        r.flushdb()
        r.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def utc_timestamp(value: datetime) -> float:
    """A database timestamp (naive = UTC, as the worker writes them) as a Unix time."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
