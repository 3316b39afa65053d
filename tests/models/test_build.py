"""`python -m models.build --budget fast`: every training stage in a temporary zoo, the adapters
trained by two worker processes, and the build's record of what it ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.train import Arch, Batch, Doc, bf16_is_faster, collate, lm_loss, model_args, new_model

ROOT = Path(__file__).resolve().parents[2]


def _build(zoo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMPOUND_ZOO_DIR": str(zoo), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "models.build", "--budget", "fast", *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    done = _build(root, "--only", "data", "demo-base", "adapters", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def test_parallel_adapters_are_all_written(zoo: Path) -> None:
    figures = json.loads((zoo / ".build" / "adapters.json").read_text())
    for task in ("router", "extract", "planner", "joiner"):
        config = json.loads((zoo / "adapters" / task / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        assert figures[task]["steps"] == 4


def test_build_record_names_the_stages_it_ran(zoo: Path) -> None:
    record = json.loads((zoo / ".build" / "build.json").read_text())
    assert list(record["stages_seconds"]) == ["data", "demo-base", "adapters"]
    assert record["jobs"] == 2
    assert 0 < record["training_minutes"] <= record["total_minutes"]


def test_a_finished_stage_is_skipped(zoo: Path) -> None:
    before = (zoo / "adapters" / "joiner" / "adapter_model.safetensors").read_bytes()
    done = _build(zoo, "--only", "adapters", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done already" in done.stderr
    assert (zoo / "adapters" / "joiner" / "adapter_model.safetensors").read_bytes() == before


def test_the_precision_probe_leaves_weights_and_grads_alone() -> None:
    model = new_model(model_args(Arch(32, 2, 4, 2, 64), 300), seed=0)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    batch: Batch = collate([[Doc(list(range(5, 40)), [1.0] * 35)]], 40)
    assert bf16_is_faster(model, params, batch, lm_loss) in (True, False)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


SCRIPT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from models import zoo

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=zoo._worker)
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 60)
    time.sleep(60)
"""


def test_workers_exit_when_the_build_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "build_like.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPOUND_ZOO_DIR": str(tmp_path)}
    main = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    worker = int(main.stdout.readline())
    main.kill()
    main.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    gone = not _alive(worker)
    if not gone:
        os.kill(worker, 9)
    assert gone, "the worker outlived the killed build"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
