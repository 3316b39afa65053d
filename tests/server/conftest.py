"""Fixtures of the server tests: one tiny checkpoint and one engine per session, databases."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy
import uvicorn
from litestar import Litestar
from litestar.testing import TestClient

from engine import Engine, GenerationRequest, StreamDelta
from server.app import create_app
from server.config import EngineConfig, LimitsConfig, ModelConfig, ServerConfig
from tests.engine.tiny_models import make_checkpoint

MODEL = "tiny"
# The shipped pipelines name the demo model; tests serve the tiny checkpoint under that name.
DEMO_MODEL = "demo-base"
POSTGRES_URL = os.environ.get(
    "COMPOUND_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# Room for long generations: the disconnect tests need a request that runs for seconds.
MAX_POSITION = 4096
MEMORY_BUDGET = 1 << 30


class RecordingEngine(Engine):
    """An engine that remembers which request ids were aborted and which finished."""

    def __init__(self, memory_budget_bytes: int | None = None, device: str | None = None) -> None:
        super().__init__(memory_budget_bytes=memory_budget_bytes, device=device)
        self.aborted: list[str] = []
        self.finished: dict[str, str | None] = {}

    def abort(self, request_id: str) -> None:
        """Record, then abort."""
        self.aborted.append(request_id)
        super().abort(request_id)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Record the finish reason of every request that ran to its end."""
        async for delta in super().stream(request):
            if delta.finished:
                self.finished[request.request_id or ""] = delta.finish_reason
            yield delta

    def is_idle(self, model: str = MODEL) -> bool:
        """True when no request holds KV blocks of `model`."""
        return self.block_manager(model).num_free == self.model_info(model).num_blocks

    def wait_idle(self, timeout_s: float, model: str = MODEL) -> bool:
        """Poll `is_idle` until it holds or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_idle(model):
                return True
            time.sleep(0.02)
        return self.is_idle(model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with a ChatML chat template."""
    return make_checkpoint(
        tmp_path_factory.mktemp("tiny-llama"), "llama", max_position=MAX_POSITION
    )


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Iterator[RecordingEngine]:
    """One CPU engine serving the tiny model as "tiny", shared by the session."""
    eng = RecordingEngine(memory_budget_bytes=MEMORY_BUDGET, device="cpu")
    eng.load_model(MODEL, tiny_model_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def demo_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    """A CPU engine serving the tiny checkpoint under the demo model's name; the zoo's
    adapter names are known (so specs naming `demo-base:planner` bind) but never loaded."""
    eng = Engine(memory_budget_bytes=MEMORY_BUDGET, device="cpu")
    zoo_adapters = Path(__file__).resolve().parents[2] / "models" / "adapters"
    eng.load_model(DEMO_MODEL, tiny_model_dir, adapter_dir=str(zoo_adapters))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def config(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerConfig:
    """Server config listing the tiny model; limits as in compound.yaml; a scratch database."""
    scratch = tmp_path_factory.mktemp("server")
    return ServerConfig(
        limits=LimitsConfig(max_body_bytes=1 << 20, max_tokens=4096, request_timeout_s=30.0),
        engine=EngineConfig(memory_budget_bytes=MEMORY_BUDGET, device="cpu"),
        models=(ModelConfig(name=MODEL, path=str(tiny_model_dir)),),
        database_url=f"sqlite:///{scratch / 'compound.db'}",
        pipelines_dir=str(scratch / "pipelines"),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a schema of its own in the test PostgreSQL.

    PostgreSQL is skipped when unreachable, except under CI=true where it must run.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except sqlalchemy.exc.OperationalError as e:
        admin.dispose()
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL}: {e.orig}")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = sqlalchemy.make_url(POSTGRES_URL)
        scoped = url.update_query_dict({"options": f"-csearch_path={schema}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def app(config: ServerConfig, engine: RecordingEngine) -> Litestar:
    """The app over the shared engine."""
    return create_app(config, engine)


@pytest.fixture
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    """An in-process HTTP client of the app."""
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def server_url(config: ServerConfig, engine: RecordingEngine) -> Iterator[str]:
    """uvicorn serving the app on a free loopback port, in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
