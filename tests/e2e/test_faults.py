"""One scenario of the fault suite (bench/faults.py) as a test: its own Postgres and Redis
servers, a local image host and the real `catalog` processes, every event delivered four
times back to back. Nothing may be stuck, lost or duplicated, and no image may fail
(issue 12, item 7: re-delivery used to fail images being analysed with a false `gave_up`).

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
