"""The steps run with one BLAS thread per process unless the environment says otherwise
(worker.pipeline.registry.limit_blas_threads): OpenBLAS's pool of one thread per core made the
steps' small numpy products several times slower."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json
    import numpy  # noqa: F401  (loads OpenBLAS before the limit, as a worker does)
    from threadpoolctl import threadpool_info
    from worker.pipeline import registry
    registry.limit_blas_threads()
    print(json.dumps(sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})))
""")


def _blas_threads(env: dict[str, str]) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    import json

    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(extra)
    return env


def test_steps_get_one_blas_thread() -> None:
    assert _blas_threads(_env()) == [1]


def test_an_explicit_setting_is_kept() -> None:
    assert _blas_threads(_env(OPENBLAS_NUM_THREADS="2")) == [2]
