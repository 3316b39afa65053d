"""Crashed replicas: a run whose server died is failed by the survivors, not left `running`.

Each test plays two replicas on one database: the app under test, and a "dead" server whose
runs are written straight into the store (as that process wrote them before it was killed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from engine import Engine
from planner import load_spec
from server.app import create_app
from server.config import ServerConfig
from server.store import ABANDONED_REASON, RunChange, StepChange, Store
from tests.server.git_fixtures import calc_spec

LEASE_S = 0.3
Client = TestClient[Litestar]
SPEC = calc_spec("leased", "1 + 1")


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """The shared database, as every replica sees it."""
    s = Store.open(database_url)
    yield s
    s.dispose()


@pytest.fixture
def client(tmp_path: Path, database_url: str, demo_engine: Engine) -> Iterator[Client]:
    """A replica with a short lease over the shared database."""
    config = ServerConfig(
        database_url=database_url, pipelines_dir=str(tmp_path), run_lease_s=LEASE_S
    )
    with TestClient(create_app(config, demo_engine)) as c:
        yield c


def held_run(store: Store, instance: str, *, age_s: float) -> str:
    """A run `instance` started, mid-step, whose lease it last renewed `age_s` ago."""
    record, _ = store.register_pipeline(load_spec(SPEC), text=SPEC, fmt="yaml", actor="t")
    run_id = str(uuid.uuid4())
    store.create_run(run_id, record, {}, actor="t", instance=instance)
    beat = datetime.now(UTC) - timedelta(seconds=age_s)
    store.apply(
        run_id,
        [
            RunChange(values={"status": "running", "heartbeat_at": beat}),
            StepChange(step="value", values={"status": "running"}),
        ],
    )
    return run_id


def status_soon(client: Client, run_id: str, status: str, timeout_s: float = 10) -> dict:
    """The run once it reaches `status` (polled, as a user would)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status"] == status or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


def test_startup_fails_the_runs_of_a_crashed_server(
    tmp_path: Path, store: Store, database_url: str, demo_engine: Engine
) -> None:
    stale = held_run(store, "dead-replica", age_s=60)
    config = ServerConfig(database_url=database_url, pipelines_dir=str(tmp_path))  # 30 s lease
    with TestClient(create_app(config, demo_engine)) as client:
        run = client.get(f"/v1/runs/{stale}").json()  # failed before the first request
        assert (run["status"], run["error"]) == ("failed", ABANDONED_REASON)
        assert [s["status"] for s in run["steps"]] == ["failed"]
        assert run["finished_at"] is not None


def test_a_replica_that_dies_while_serving_is_noticed_by_the_survivors(
    client: Client, store: Store
) -> None:
    crashed = held_run(store, "dead-replica", age_s=0)  # it was alive a moment ago
    posted = client.post("/v1/pipelines", content=SPEC, headers={"Content-Type": "text/yaml"})
    assert posted.status_code in (200, 201), posted.text
    live = client.post("/v1/pipelines/leased/runs", json={"inputs": {}})
    assert live.json()["status"] == "succeeded"  # this replica's own run is unaffected
    run = status_soon(client, crashed, "failed")
    assert (run["status"], run["error"]) == ("failed", ABANDONED_REASON)


def test_a_live_replica_keeps_its_long_runs(client: Client, store: Store) -> None:
    # A run this replica holds, long past one lease: it renews it, so another replica's
    # sweep leaves it alone.
    own = client.app.state.pipelines.runs.instance
    running = held_run(store, own, age_s=60)
    time.sleep(1.0)  # renewals every LEASE_S / 3: about ten
    assert store.fail_abandoned(lease_s=5, instance="other-replica") == []  # 60 s unrenewed
    assert store.get_run(running).status == "running"
