"""Three scenarios of the fault suite (bench/faults.py) as tests: each runs its own Postgres
and Redis servers (other ports, never the machine's shared ones), a local image host and the
real `catalog` processes. Every event delivered four times back to back (issue 12, item 7:
re-delivery used to fail images being analysed with a false `gave_up`); Redis stopped and
restarted; Postgres stopped for 15 s while events keep coming. Nothing may be stuck, lost or
duplicated, and no image may fail.

The whole suite (worker kill, Redis restart, Postgres outage, ingest kill, duplicates, poison)
runs with `python -m bench.faults`; it takes far longer than a test should.
"""

from __future__ import annotations

import pytest

from bench.faultkit.report import notes
from bench.faultkit.servers import missing_tools
from bench.faults import Options, run_suite

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(600)
def test_four_fold_delivery_of_every_event_is_harmless() -> None:
    missing = missing_tools()
    if missing:
        pytest.skip("the fault suite needs " + ", ".join(missing))
    # 12 listings x 2 images, each image served after 1 s: re-deliveries arrive while the
    # first delivery's images are still being analysed.
    opts = Options(quick=False, window=240, max_recovery=240)
    [result] = run_suite(["duplicates"], opts, log=lambda _line: None)
    detail = notes(result)
    assert "error" not in result, detail
    assert (result["stuck"], result["lost"], result["duplicated"]) == (0, 0, 0), detail
    assert result["false_failures"] == 0 and result["failed"] == 0, detail
    assert result["done"] == result["images"] == 24, detail
    assert result["listings_done"] == result["listings"] == 12, detail
    assert result["recovery_s"] is not None, detail


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scenario", ["redis_restart", "postgres_outage"])
def test_the_test_stops_and_restarts_its_own_servers_and_nothing_is_lost(scenario: str) -> None:
    """Issue 12's fault test against real servers that the test itself stops and restarts (its
    own instances on other ports, never the machine's shared ones): Redis for 5 s, Postgres for
    15 s while events keep coming."""
    missing = missing_tools()
    if missing:
        pytest.skip("the fault suite needs " + ", ".join(missing))
    opts = Options(quick=True, window=240, max_recovery=240, pg_outage=15.0)
    [result] = run_suite([scenario], opts, log=lambda _line: None)
    detail = notes(result)
    assert "error" not in result, detail
    assert (result["stuck"], result["lost"], result["duplicated"]) == (0, 0, 0), detail
    assert result["false_failures"] == 0 and result["failed"] == 0, detail
    assert result["done"] == result["images"], detail
    assert result["listings_done"] == result["listings"], detail
    assert result["recovery_s"] is not None, detail
