"""Fixtures of the shipped-pipeline tests: the tiny checkpoint served as the demo model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import Engine
from tests.engine.tiny_models import make_checkpoint

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"
ADAPTERS = REPO / "models" / "adapters"  # named by f1's models; validate reads only the names
# The specs name "demo-base"; a tiny random checkpoint stands in for it (gibberish text, real
# machinery), so the tests need no trained model.
DEMO_MODEL = "demo-base"
MEMORY_BUDGET = 1 << 30


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint."""
    return make_checkpoint(tmp_path_factory.mktemp("demo-base"), "llama", max_position=4096)


@pytest.fixture(scope="session")
def demo_engine(demo_checkpoint: Path) -> Iterator[Engine]:
    """A CPU engine serving the tiny checkpoint as the demo model."""
    engine = Engine(memory_budget_bytes=MEMORY_BUDGET, device="cpu")
    engine.load_model(DEMO_MODEL, demo_checkpoint)
    yield engine
    engine.shutdown()


@pytest.fixture
def config_file(tmp_path: Path, demo_checkpoint: Path) -> Path:
    """A compound.yaml serving the tiny checkpoint as the demo model, shipped pipelines."""
    file = tmp_path / "compound.yaml"
    file.write_text(
        "engine: {device: cpu, memory_budget_bytes: 1073741824}\n"
        f"models:\n  - {{name: {DEMO_MODEL}, path: {demo_checkpoint}, adapter_dir: {ADAPTERS}}}\n"
        f"pipelines_dir: {PIPELINES}\n"
        f"database_url: sqlite:///{tmp_path / 'compound.db'}\n"
    )
    return file
