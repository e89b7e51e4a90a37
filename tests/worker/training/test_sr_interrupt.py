"""`catalog train sr` stopped with Ctrl-C keeps the best checkpoint so far and says where;
`--device` defaults to auto like CATALOG_DEVICE (issue 13, item 10)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from tests.support.images import write_photo
from tests.support.procs import CATALOG, ROOT, catalog_env
from worker.cli.main import main
from worker.steps.superres import load_inhouse


def photos(folder: Path, count: int = 4) -> Path:
    folder.mkdir()
    for seed in range(count):
        write_photo(folder / f"p{seed}.jpg", size=(96, 72), seed=seed)
    return folder


@pytest.mark.slow  # trains and evaluates a (tiny) model: ~8 s on 2 loaded cores
def test_interrupt_keeps_the_weights_so_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted before any evaluation: the weights so far are evaluated and saved."""
    from worker.training.sr import train_sr

    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    try:
        result = train_sr(photos(tmp_path / "p"), tmp_path / "out", steps=1000, eval_every=500, batch_size=2,
                          patch=32, features=8, blocks=1, holdout=1, progress=False)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped train_sr without saving anything")
    assert result["interrupted_at_step"] == 3 and result["best"]["step"] == 3
    model, saved = load_inhouse(Path(result["checkpoint"]))
    assert saved["step"] == 3 and saved["metrics"]["interrupted"] is True
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)
    written = json.loads((tmp_path / "out" / "inhouse-x2.metrics.json").read_text())
    assert written["interrupted_at_step"] == 3


def test_ctrl_c_on_a_real_run_saves_the_best_checkpoint_and_says_where(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = catalog_env(data_dir=str(tmp_path / "data"))
    log = tmp_path / "train.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([*CATALOG, "train", "sr", str(photos(tmp_path / "p")), "--steps", "100000",
                                 "--eval-every", "2", "--batch-size", "2", "--patch", "32", "--holdout", "1",
                                 "--out", str(out), "--device", "cpu"],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=fh)
        try:
            checkpoint = out / "inhouse-x2.pt"
            deadline = time.monotonic() + 120
            while not checkpoint.exists():  # the first evaluation saved a best checkpoint
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint after 120 s"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = log.read_text()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    line = next(text for text in stderr.splitlines() if text.startswith("train sr: interrupted at step"))
    assert f"is saved at {checkpoint}" in line
    text = stdout.decode()
    metrics = json.loads(text[text.index("{"):])  # after the evaluation lines
    assert metrics["interrupted_at_step"] >= 2 and metrics["checkpoint"] == str(checkpoint)
    _model, saved = load_inhouse(checkpoint)
    assert saved["step"] == metrics["best"]["step"]


@pytest.mark.parametrize(("cuda", "expected"), [(False, "cpu"), (True, "cuda")])
def test_device_defaults_to_auto(cuda: bool, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.training.sr as sr

    seen: dict[str, Any] = {}

    def fake_train(paths: Any, target: Any, **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return {"checkpoint": str(tmp_path / "x.pt"), "interrupted_at_step": None}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(sr, "train_sr", fake_train)
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(main, ["train", "sr", str(photos(tmp_path / "p"))])
    assert result.exit_code == 0, result.output
    assert seen["device"] == expected
    helped = CliRunner().invoke(main, ["train", "sr", "--help"])
    assert "[default: auto]" in helped.output


def test_device_cpu_still_works_and_cuda_without_a_gpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    import worker.training.sr as sr

    seen: dict[str, Any] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sr, "train_sr", lambda paths, target, **kw: seen.update(kw) or {"interrupted_at_step": None})
    monkeypatch.setenv("CATALOG_DATA_DIR", str(tmp_path / "data"))
    folder = str(photos(tmp_path / "p"))
    assert CliRunner().invoke(main, ["train", "sr", folder, "--device", "cpu"]).exit_code == 0
    assert seen["device"] == "cpu"
    refused = CliRunner().invoke(main, ["train", "sr", folder, "--device", "cuda"])
    assert refused.exit_code == 2 and "torch sees no CUDA device" in refused.output
