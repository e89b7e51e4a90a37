"""Test fixtures: a real Postgres database per test session (migrated once, one outer
transaction rolled back per test), SQLite files copied from a migrated template, and a real
Redis database reserved for the tests.

Markers are applied here, centrally, from what a test uses (see ``pytest_collection_modifyitems``):
``postgres`` and ``redis`` for the servers it needs, ``slow`` for tests that spawn processes or
take more than a few seconds, so that ``-m "not slow"`` is a fast run. Everything a test creates
on the shared servers is removed again: Redis keys written through ``redis_client`` or named by
``unique()``, and every database made by ``create_pg_database`` (also those a killed run left).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from sqlalchemy.orm import Session

from db.migrate import upgrade
from db.session import dispose_engines, get_engine
from tests.support.services import (
    PG_URL_BASE,
    REDIS_URL,
    TrackingRedis,
    _created_databases,
    _drop_orphaned_databases,
    _unique_names,
    create_pg_database,
    drop_pg_database,
)
from worker.config import Settings, load_settings, reset_settings

# --- markers ------------------------------------------------------------------------------
# A test needs a server when it uses one of these fixtures, or when its body names one of these
# helpers (tests that open their own throwaway database or client inside the test).
POSTGRES_FIXTURES = frozenset({"pg_url", "pg_session", "fresh_pg_url"})
POSTGRES_NAMES = frozenset({"throwaway_pg", "create_pg_database", "PG_URL_BASE"})
REDIS_FIXTURES = frozenset({"redis_client"})
REDIS_NAMES = frozenset({"REDIS_URL"})
#: Names of helpers that start processes: a test calling one is slow.
SPAWN_NAMES = frozenset({"run_catalog", "Proc", "Popen", "subprocess"})
#: Tests measured above ~3 s on the 2-core development machine (`--durations`), by node id
#: prefix; the terminal summary names any other test that took that long (see below).
SLOW_SECONDS = 3.0
SLOW_TESTS = (
    "tests/e2e/",                       # real `catalog` worker/ingest processes
    "tests/test_docker.py",
    "tests/worker/cli/test_demo.py",    # the whole model pipeline on real photos (22 s)
    "tests/worker/steps/test_superres.py::test_tiled_equals_untiled[realesrgan-x4plus",  # 5 s
    "tests/worker/steps/test_superres.py::test_torch_port_matches_ncnn[realesrgan-x4plus]",  # 2.6-3 s
    "tests/worker/fraud/test_contact.py::test_phone_and_email_on_photo_are_flagged_with_boxes",  # OCR, 4.4 s
    "tests/worker/steps/test_segmentation.py::test_mask_matches_object_on_plain_backgrounds",  # 3.8 s
    "tests/worker/steps/test_detection.py::test_concurrent_threads_get_their_own_detections",  # 3.7 s
    "tests/worker/review/test_queue.py::test_twenty_reviewers_claim_one_hundred_distinct_flags",  # 3.1 s
    "tests/worker/fraud/test_contact.py::test_text_on_a_large_photo_maps_back_to_its_pixels",  # OCR, 6.2 s
    "tests/worker/steps/test_segmentation.py::test_busy_backgrounds_figure",  # 4.1 s
    "tests/worker/steps/test_detection.py::test_torchvision_detector_needs_a_checkpoint",  # 3.8 s
    "tests/worker/steps/test_segmentation.py::test_batch_equals_one_by_one_for_different_sizes",  # 3.0 s
    # Under 3 s each, but together ~17 s of waiting on real timers (deadlines, claim-idle times)
    # or training: left to the full run so that the fast run stays under a minute.
    "tests/worker/io/test_deadline.py::test_slow_",  # 3 tests, 1.5 s each
    "tests/worker/io/test_deadline.py::test_body_cut_by_the_watchdog_is_not_returned_as_an_image",
    "tests/worker/io/test_deadline.py::test_each_redirect_hop_shares_one_deadline",
    "tests/worker/intake/test_ingest.py::test_poison_first_a_deeply_nested_entry_does_not_block_the_valid_one",
    "tests/worker/intake/test_ingest.py::test_entry_is_not_acked_when_publishing_fails_and_is_reclaimed",
    "tests/worker/intake/test_ingest.py::test_dead_consumers_are_removed_once_nothing_is_pending",
    "tests/worker/intake/test_ingest.py::test_a_running_ingest_removes_the_consumer_whose_entries_it_took_over",
    "tests/worker/intake/test_ingest.py::test_continuous_mode_survives_a_broker_outage",
    "tests/worker/cli/test_main.py::test_train_sr_writes_checkpoint_and_metrics",  # 2-2.5 s
    # Visual search: the real pipeline on photos, a fresh interpreter, the pgvector server.
    "tests/worker/cli/test_search.py",  # the real pipeline on six photos (~35 s)
    "tests/worker/api/test_search_routes.py::test_analyze_describes_a_photo_and_stores_nothing",
    "tests/worker/api/test_search_routes.py::test_search_by_photo_finds_the_listing_whose_photo_is_a_crop_of_it",
    "tests/worker/search/test_analyze.py::test_a_cup_photo_gets_category_tags_colours_boxes_and_vectors_and_nothing_is_stored",
    "tests/worker/search/test_pipeline.py::test_real_photo_gets_full_and_region_vectors_and_loses_them_when_deleted",
    "tests/worker/search/test_pipeline.py::test_failed_analysis_removes_the_vectors",
    "tests/worker/search/test_pipeline.py::test_usearch_then_onnxruntime_does_not_crash_the_process",
    # Operations: training interrupted by a real SIGINT; the first torch import for the batcher.
    "tests/worker/training/test_sr_interrupt.py",
    "tests/worker/observe/test_metrics.py::test_batcher_records_batch_sizes",
)


def _names_used(item: pytest.Item) -> set[str]:
    """Global names the test function's body (and the functions nested in it) refers to."""
    names: set[str] = set()
    code = getattr(getattr(item, "function", None), "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(const for const in current.co_consts if hasattr(const, "co_names"))
    return names


def _needs(item: pytest.Item, fixtures: frozenset[str], names: frozenset[str]) -> bool:
    return bool(set(getattr(item, "fixturenames", ())) & fixtures or _names_used(item) & names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        in_e2e = item.nodeid.startswith("tests/e2e/")
        module_redis = getattr(getattr(item, "module", None), "REDIS_URL", None) == REDIS_URL
        if _needs(item, POSTGRES_FIXTURES, POSTGRES_NAMES) or params.get("db_url") == "postgres":
            item.add_marker(pytest.mark.postgres)
        # End-to-end modules reach the tests' Redis through their own clients and processes;
        # the embedded end-to-end tests deliberately run without any Redis.
        if _needs(item, REDIS_FIXTURES, REDIS_NAMES) or (in_e2e and module_redis):
            item.add_marker(pytest.mark.redis)
        if item.nodeid.startswith(SLOW_TESTS) or _names_used(item) & SPAWN_NAMES:
            item.add_marker(pytest.mark.slow)


#: Seconds (setup + call + teardown) of each test run without the slow marker.
_unmarked_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "slow" not in report.keywords:
        _unmarked_seconds[report.nodeid] = _unmarked_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # Shared fixtures (a model loaded once) make the first user of one look slow; tests still
    # listed here after a second look belong in SLOW_TESTS.
    slow = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > SLOW_SECONDS), reverse=True)
    if slow:
        terminalreporter.section(f"tests over {SLOW_SECONDS:.0f} s without the slow marker")
        for seconds, nodeid in slow:
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}  (SLOW_TESTS in tests/conftest.py)")


# --- settings ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _clean_settings_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CATALOG_") and not key.startswith("CATALOG_TEST_") and key != "CATALOG_VENV":
            monkeypatch.delenv(key)
    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def _make(**overrides: object) -> Settings:
        values: dict[str, object] = {"data_dir": tmp_path / "data", "steps": ["metadata"]}
        values.update(overrides)
        return load_settings(**values)

    return _make


# --- Postgres ------------------------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    # Without Postgres here the tests that need it say so themselves.
    with contextlib.suppress(psycopg2.OperationalError):
        _drop_orphaned_databases()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for name in list(_created_databases):
        drop_pg_database(name)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated Postgres database for this test session."""
    name = create_pg_database()
    url = f"{PG_URL_BASE}/{name}"
    upgrade(url)
    yield url
    drop_pg_database(name)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty Postgres database of this test's own (no migrations), dropped afterwards."""
    name = create_pg_database("catalog_fresh")
    yield f"{PG_URL_BASE}/{name}"
    drop_pg_database(name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    dispose_engines()
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    """Both supported databases. Postgres tests share one migrated database and must clean
    up after themselves through the `session`-level rollback or unique ids."""
    if request.param == "sqlite":
        path = tmp_path / "catalog.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def pg_session(pg_url: str) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test, whatever the
    code under test commits (commits become savepoint releases)."""
    engine = get_engine(pg_url)
    conn = engine.connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        conn.close()


# --- Redis ---------------------------------------------------------------------------------


@pytest.fixture
def redis_client() -> Iterator[TrackingRedis]:
    """The tests' Redis database. Keys written through it, and keys named by ``unique()``
    during the test, are deleted afterwards."""
    client = TrackingRedis.from_url(REDIS_URL)
    assert isinstance(client, TrackingRedis)
    client.ping()
    yield client
    leftovers = client.written | _unique_names
    if leftovers:
        client.delete(*sorted(leftovers))
    client.close()


@pytest.fixture(autouse=True)
def _forget_unique_names() -> Iterator[None]:
    _unique_names.clear()
    yield
    _unique_names.clear()


