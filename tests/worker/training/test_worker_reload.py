"""Issue 9, acceptance 1 and 4 with a real `catalog worker` (Celery, Redis broker, Postgres):
a head promoted with `catalog models promote` is used for the next listing without a restart,
and `catalog models rollback` puts the zero-shot map back for the one after.

The head promoted here is a fixed one (it always says "space posters", a category the
taxonomy lacks), so the switch is unmistakable; training it is test_retrain's job."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from db.session import transaction
from tests.support.images import write_photo
from tests.support.procs import Proc, run_catalog, wait_for
from tests.support.training import listing_category as _category
from tests.support.training import submit_listing as _submit
from worker.config import load_settings
from worker.training import registry
from worker.training.category import save_head

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
def test_running_worker_switches_head_on_promote_and_rollback(deployment: dict) -> None:
    d = deployment
    photos = [write_photo(d["photos"] / f"p{i}.jpg", size=(400, 300), seed=i) for i in range(3)]
    procs = [Proc(["worker", "--concurrency", "1"], d["env"], d["tmp"] / "worker.log"),
             Proc(["ingest"], d["env"], d["tmp"] / "ingest.log")]
    d["procs"].extend(procs)

    _submit(d, "L1", photos[0])
    first = wait_for(partial(_category, d, "L1"), 180, "L1 analysed", procs)
    assert first[1] == "category-map" and "category-head" not in first[2]  # type: ignore[index]

    # An operator promotes a head while the worker keeps running.
    settings = load_settings(database_url=d["url"], data_dir=d["data"])
    linear = torch.nn.Linear(1280, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([5.0, 0.0]))
    path = save_head(linear, ["space posters", "other"], registry.model_dir(settings, "category-head") / "v" / "h.pt")
    with transaction(d["url"]) as s:
        version = registry.register(s, registry.CATEGORY_HEAD, path, {}, None).version
    promoted = run_catalog(["models", "promote", f"category-head@{version}"], d["env"])
    assert promoted.returncode == 0, promoted.stderr

    _submit(d, "L2", photos[1])
    second = wait_for(partial(_category, d, "L2"), 120, "L2 analysed", procs)
    assert second[:2] == ("space posters", "category-head")  # type: ignore[index]
    assert second[2].endswith(f"+category-head@{version}")  # type: ignore[index]

    rolled = run_catalog(["models", "rollback", "category-head"], d["env"])
    assert rolled.returncode == 0, rolled.stderr
    _submit(d, "L3", photos[2])
    third = wait_for(partial(_category, d, "L3"), 120, "L3 analysed", procs)
    assert third[1] == "category-map" and third[0] != "space posters"  # type: ignore[index]
    assert all(p.popen.poll() is None for p in procs)  # never restarted
