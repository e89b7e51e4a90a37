"""The model registry: ``model_versions`` rows, the champion file workers read, promotion,
rollback, and the lock that keeps retrains one at a time.

A retrained model is a file plus a row (path, SHA-256, metrics, status ``candidate`` /
``champion`` / ``retired``, the run that made it). Workers never query this table: the champion
of a model is also a FILE in the model directory (``<models>/<name>/champion.<ext>``), replaced
atomically (``os.replace``) on promotion and rollback, and the tagging step reads that file by
path+mtime+size between images. So a promotion reaches running workers at their next image,
without a restart and without ``worker.steps`` importing the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db import models as m
from db.session import get_engine
from worker.config import Settings
from worker.fraud.champion import FRAUD_CHAMPION
from worker.models.weights import file_sha256
from worker.steps.tagging import ATTRIBUTE_PREFIX, CHAMPION_HEAD

CATEGORY_HEAD = "category-head"
FRAUD_SCORER = "fraud-scorer"
#: Champion file of each model the retrain produces, relative to the model directory.
CHAMPION_FILES = {CATEGORY_HEAD: CHAMPION_HEAD, FRAUD_SCORER: FRAUD_CHAMPION}
#: Advisory lock key of the retrain (any constant both processes agree on).
RETRAIN_LOCK_KEY = zlib.crc32(b"catalog-worker retrain")


class RegistryError(Exception):
    """A registry operation was refused; the message says why."""


def model_dir(settings: Settings, name: str) -> Path:
    """Where the versions of ``name`` and its champion file live (under CATALOG_SR_MODEL_DIR,
    i.e. ``<data_dir>/models`` by default)."""
    return settings.effective_sr_model_dir / name


def champion_file(settings: Settings, name: str) -> Path:
    """The champion file of ``name``: a fixed one per model, plus one per attribute head
    (``attribute-head-<slug>/champion.pt``, the folder the tagging step scans)."""
    if name.startswith(ATTRIBUTE_PREFIX) and re.fullmatch(r"[a-z0-9_]+", name[len(ATTRIBUTE_PREFIX):]):
        return settings.effective_sr_model_dir / name / "champion.pt"
    if name not in CHAMPION_FILES:
        raise RegistryError(f"unknown model {name!r}; known: {', '.join(CHAMPION_FILES)}, "
                            f"{ATTRIBUTE_PREFIX}<attribute>")
    return settings.effective_sr_model_dir / CHAMPION_FILES[name]


def current_champion_path(settings: Settings, name: str) -> Path | None:
    """The file running workers use for ``name`` now, or None (zero-shot map / fixed weights)."""
    path = champion_file(settings, name)
    return path if path.is_file() else None


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def get_version(session: Session, name: str, version: str) -> m.ModelVersion:
    row = session.scalars(select(m.ModelVersion).where(m.ModelVersion.name == name,
                                                       m.ModelVersion.version == version)).first()
    if row is None:
        raise RegistryError(f"no version {version!r} of {name!r} (see `catalog models list`)")
    return row


def find_version(session: Session, version: str) -> m.ModelVersion:
    """A version by ``NAME@VERSION``, ``VERSION`` alone (when unambiguous) or row id."""
    if "@" in version:
        name, _, short = version.partition("@")
        return get_version(session, name, short)
    rows = list(session.scalars(select(m.ModelVersion).where(m.ModelVersion.version == version)))
    if not rows and version.isdigit():
        row = session.get(m.ModelVersion, int(version))
        rows = [row] if row is not None else []
    if len(rows) != 1:
        raise RegistryError(f"{'no' if not rows else 'more than one'} model version {version!r}; "
                            "use NAME@VERSION (see `catalog models list`)")
    return rows[0]


def champion(session: Session, name: str) -> m.ModelVersion | None:
    return session.scalars(select(m.ModelVersion).where(
        m.ModelVersion.name == name, m.ModelVersion.status == "champion")
        .order_by(m.ModelVersion.id.desc())).first()


def register(session: Session, name: str, path: Path, metrics: dict[str, Any],
             run_id: int | None) -> m.ModelVersion:
    """A new candidate row for the artifact at ``path``. Its version is the first 8 hex digits
    of the file's SHA-256, the same digest the tagging step records on every tag it makes."""
    digest = file_sha256(path)
    version = digest[:8]
    existing = session.scalars(select(m.ModelVersion).where(m.ModelVersion.name == name,
                                                            m.ModelVersion.version == version)).first()
    if existing is not None:  # the very same weights again: keep one row
        return existing
    row = m.ModelVersion(name=name, version=version, path=str(path), status="candidate", metrics=metrics,
                         checksum=digest, training_run_id=run_id)
    session.add(row)
    session.flush()
    return row


def install(settings: Settings, name: str, source: Path | None) -> None:
    """Make ``source`` the champion file (or remove it when None) in one atomic step: copy to a
    temporary file in the same folder, then ``os.replace``. A worker that opens the path sees
    the old file or the new one, never half of one. ``copyfile`` gives the new file a fresh
    mtime, which is what the workers' cache key notices."""
    target = champion_file(settings, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        return
    fd, tmp = tempfile.mkstemp(prefix=".champion-", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _lock_model(session: Session, name: str) -> None:
    """Serialise promotions and rollbacks of one model (two operators, or an operator and the
    retrain): lock its rows until the transaction ends (Postgres; SQLite writes are serial)."""
    session.execute(select(m.ModelVersion.id).where(m.ModelVersion.name == name)
                    .order_by(m.ModelVersion.id).with_for_update()).all()


def _verified(row: m.ModelVersion) -> Path:
    if not row.path or not Path(row.path).is_file():
        raise RegistryError(f"{row.name}@{row.version}: artifact {row.path} is missing")
    if row.checksum and file_sha256(Path(row.path)) != row.checksum:
        raise RegistryError(f"{row.name}@{row.version}: artifact {row.path} does not match its checksum")
    return Path(row.path)


def promote(session: Session, settings: Settings, row: m.ModelVersion) -> m.ModelVersion | None:
    """Make ``row`` the champion of its model; the previous champion is retired. Returns the
    previous champion. The file is replaced last, inside the caller's transaction, so a failed
    copy leaves both the rows and the workers on the old champion."""
    path = _verified(row)
    _lock_model(session, row.name)
    previous = champion(session, row.name)
    if previous is not None and previous.id == row.id:
        install(settings, row.name, path)  # already champion: repair the file if needed
        return None
    now = _now()
    if previous is not None:
        previous.status, previous.retired_at = "retired", now
    row.status, row.promoted_at, row.retired_at = "champion", now, None
    session.flush()
    install(settings, row.name, path)
    return previous


def rollback(session: Session, settings: Settings, name: str) -> tuple[m.ModelVersion, m.ModelVersion | None]:
    """Retire the champion of ``name`` and restore the champion before it (the retired version
    promoted most recently before it); with none, the champion file is removed and workers fall
    back to the zero-shot map / fixed weights. Returns (retired, restored or None)."""
    _lock_model(session, name)
    current = champion(session, name)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    query = select(m.ModelVersion).where(m.ModelVersion.name == name, m.ModelVersion.id != current.id,
                                         m.ModelVersion.promoted_at.is_not(None))
    if current.promoted_at is not None:
        query = query.where(m.ModelVersion.promoted_at <= current.promoted_at)
    restored = session.scalars(query.order_by(m.ModelVersion.promoted_at.desc(),
                                              m.ModelVersion.id.desc())).first()
    now = _now()
    current.status, current.retired_at = "retired", now
    if restored is not None:
        path = _verified(restored)
        restored.status, restored.retired_at = "champion", None
        session.flush()
        install(settings, name, path)
    else:
        session.flush()
        install(settings, name, None)
    return current, restored


# --- one retrain at a time -----------------------------------------------------------------


@dataclass
class LockState:
    acquired: bool
    how: str  # "postgres advisory lock" | "file lock <path>"


@contextlib.contextmanager
def retrain_lock(settings: Settings) -> Iterator[LockState]:
    """Try to hold the retrain lock for the ``with`` block, without waiting: ``acquired`` is
    False when another retrain (another beat, another ``--now``) holds it. Postgres: a
    session-level advisory lock on its own connection, released when the block ends or the
    process dies. SQLite: ``flock`` on ``<data_dir>/retrain.lock`` (one machine, which is what
    the embedded setup is)."""
    url = settings.effective_database_url
    if url.startswith("postgresql"):
        with get_engine(url).connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": RETRAIN_LOCK_KEY}).scalar())
            conn.commit()
            try:
                yield LockState(got, "postgres advisory lock")
            finally:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RETRAIN_LOCK_KEY})
                    conn.commit()
        return
    path = settings.data_dir / "retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        try:
            yield LockState(got, f"file lock {path}")
        finally:
            if got:
                fcntl.flock(handle, fcntl.LOCK_UN)
