"""The pieces between the API and the executor: configuration, statistics, limits, backends,
the event recorder, and pipelines that call pipelines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from engine import Engine
from executor import events
from executor.backends import EngineBackend, OpenAIBackend
from executor.run import DEFAULT_PER_RESOURCE
from server.app import create_app
from server.config import LimitsConfig, ServerConfig, load_config, parse_config
from server.errors import ConfigError
from server.recorder import TRUNCATED, cap_output, changes_for
from server.runtime import MAX_PIPELINE_DEPTH, build_backends, run_limits, statistics
from server.store import RunChange, StatRecord, StepChange

# -- configuration -------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COMPOUND_DATABASE_URL", raising=False)
    file = tmp_path / "conf" / "compound.yaml"
    file.parent.mkdir()
    file.write_text(
        "database_url: sqlite:///data/c.db\npipelines_dir: ../specs\ntools: {kb_path: kb.json}\n"
    )
    config = load_config(file)
    assert config.database_url == f"sqlite:///{tmp_path / 'conf' / 'data' / 'c.db'}"
    assert config.pipelines_dir == str(tmp_path / "specs")
    assert config.tools.kb_path == str(tmp_path / "conf" / "kb.json")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:////abs/c.db",
        "postgresql+psycopg://u:p%40ss@db:5432/compound",
    ],
)
def test_other_database_urls_are_kept(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COMPOUND_DATABASE_URL", raising=False)
    file = tmp_path / "c.yaml"
    file.write_text(f"database_url: '{url}'\n")
    assert load_config(file).database_url == url


def test_the_environment_overrides_the_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("database_url: sqlite:///c.db\n")
    monkeypatch.setenv("COMPOUND_DATABASE_URL", "postgresql+psycopg://x@h/db")
    assert load_config(file).database_url == "postgresql+psycopg://x@h/db"
    monkeypatch.setenv("COMPOUND_DATABASE_URL", "not a url")
    with pytest.raises(ConfigError, match="COMPOUND_DATABASE_URL: database_url: invalid"):
        load_config(file)


def test_providers_and_limits_parse() -> None:
    config = parse_config(
        "providers:\n"
        "  - {name: cloud, base_url: 'https://api.example/v1', api_key_env: CLOUD_KEY,"
        " models: {cloud-small: small-2024}}\n"
        "limits: {run_timeout_s: 5, per_resource: {'model:demo-base': 2}}\n"
    )
    (provider,) = config.providers
    assert (provider.name, provider.models) == ("cloud", {"cloud-small": "small-2024"})
    assert config.limits.run_timeout_s == 5 and config.limits.per_resource == {"model:demo-base": 2}
    with pytest.raises(ConfigError, match=r"limits\.max_fan_out"):
        parse_config("limits: {max_fan_out: 0}")


# -- runtime -------------------------------------------------------------------------------------


def test_run_limits_cap_and_merge_per_resource() -> None:
    limits = run_limits(
        LimitsConfig(
            run_timeout_s=7,
            max_fan_out=9,
            max_run_tokens=11,
            max_run_concurrency=3,
            per_resource={"model:demo-base": 2},
        )
    )
    assert (limits.run_timeout_s, limits.max_fan_out, limits.max_total_tokens) == (7, 9, 11)
    assert limits.max_concurrency == 3
    assert limits.per_resource == {**DEFAULT_PER_RESOURCE, "model:demo-base": 2}


def test_statistics_from_rows() -> None:
    rows = [
        StatRecord(key="model:demo-base", count=4, failures=1, mean_latency_s=0.5, mean_tokens=20),
        StatRecord(key="tool:kb.search", count=2, failures=0, mean_latency_s=0.1, mean_tokens=0),
        StatRecord(key="step:triage/intent", count=1, failures=0, mean_latency_s=2, mean_tokens=3),
        StatRecord(key="tool:http.get", count=3, failures=3, mean_latency_s=0, mean_tokens=0),
    ]
    stats = statistics(rows)
    model = stats.model("demo-base")
    assert model is not None and (model.latency_s, model.failure_rate, model.count) == (
        0.5,
        0.25,
        4,
    )
    assert stats.tool("kb.search") is not None
    step = stats.step("triage", "intent")
    assert step is not None and step.latency_s == 2
    assert stats.tool("http.get") is None  # never succeeded: no latency to go by


def test_backends_engine_first_then_providers(
    demo_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(
        "providers: [{name: cloud, base_url: 'http://127.0.0.1:9/v1', api_key_env: CLOUD_KEY,"
        " models: {cloud-small: small}}]"
    )
    monkeypatch.setenv("CLOUD_KEY", "secret")
    backends = build_backends(demo_engine, config.providers)
    engine_backend, provider = backends.backends
    assert isinstance(engine_backend, EngineBackend) and isinstance(provider, OpenAIBackend)
    assert provider.api_key == "secret"
    assert backends.serves("demo-base") and backends.serves("cloud-small")
    assert not backends.serves("elsewhere")


# -- recorder ------------------------------------------------------------------------------------


def test_events_become_row_changes() -> None:
    started: dict[str, float] = {}

    def changes(event: events.Event, now: float) -> list[object]:
        return changes_for(event, now=now, started=started, max_output_bytes=64)

    assert changes(events.TokenDelta(run_id="r", step="a", text="x"), 1.0) == []
    (run,) = changes(events.RunStarted(run_id="r", pipeline="p", inputs={}), 1.0)
    assert isinstance(run, RunChange) and run.values["status"] == "running"
    changes(events.StepStarted(run_id="r", step="a", attempt=1), 10.0)
    (failed,) = changes(events.StepFailed(run_id="r", step="a", error="boom", attempts=2), 12.5)
    assert isinstance(failed, StepChange)
    assert failed.values["duration_s"] == 2.5 and failed.values["attempts"] == 2
    finished = events.StepFinished(
        run_id="r",
        step="b",
        output="y" * 100,
        started_at=1.0,
        finished_at=3.0,
        attempts=1,
        tokens=5,
        model="demo-base",
    )
    (done,) = changes(finished, 4.0)
    assert done.values["output"].endswith(TRUNCATED) and done.values["output_truncated"]
    assert (done.values["duration_s"], done.values["tokens"]) == (2.0, 5)
    (end,) = changes(events.RunFailed(run_id="r", error="e", failed_step="a"), 5.0)
    assert (end.values["status"], end.values["failed_step"]) == ("failed", "a")
    # The run manager stores a cancelled run's end, with the reason only it knows.
    assert changes(events.RunCancelled(run_id="r"), 6.0) == []


def test_cap_output_keeps_small_values_as_json() -> None:
    assert cap_output({"a": (1, 2)}, 100) == ({"a": [1, 2]}, False)
    cut, truncated = cap_output(["é" * 50], 20)
    assert truncated and cut.endswith(TRUNCATED) and len(cut.encode()) < 40


# -- pipelines calling pipelines -----------------------------------------------------------------

CHILD = """\
name: child
inputs: {n: {type: integer}}
tools: [calc]
steps:
  double: {tool: calc, args: {expression: "{{ inputs.n }} * 2"}}
outputs: {doubled: "{{ steps.double.output }}"}
"""
PARENT = """\
name: parent
steps:
  call: {pipeline: {name: child, inputs: {n: 21}}}
outputs: {answer: "{{ steps.call.output.doubled }}"}
"""
CALLER = """\
name: {name}
steps:
  again: {{pipeline: {{name: {callee}}}}}
outputs: {{x: "{{{{ steps.again.output }}}}"}}
"""


@pytest.fixture
def client(tmp_path: Path, demo_engine: Engine) -> Iterator[TestClient[Litestar]]:
    """An app with an empty pipelines folder."""
    config = ServerConfig(
        database_url=f"sqlite:///{tmp_path / 'c.db'}", pipelines_dir=str(tmp_path / "none")
    )
    with TestClient(create_app(config, demo_engine)) as c:
        yield c


def post_yaml(client: TestClient[Litestar], text: str) -> int:
    """Register a spec; the status code."""
    response = client.post("/v1/pipelines", content=text, headers={"content-type": "text/yaml"})
    return response.status_code


def test_a_pipeline_step_runs_the_stored_pipeline(client: TestClient[Litestar]) -> None:
    assert post_yaml(client, PARENT) == 422  # `child` is not registered yet
    assert post_yaml(client, CHILD) == 201
    assert post_yaml(client, PARENT) == 201
    run = client.post("/v1/pipelines/parent/runs", json={}).json()
    assert (run["status"], run["outputs"]) == ("succeeded", {"answer": 42})
    assert run["steps"][0]["output"] == {"doubled": 42}


def test_pipelines_calling_each_other_stop_at_the_depth_limit(
    client: TestClient[Litestar],
) -> None:
    assert post_yaml(client, CALLER.format(name="loop", callee="loop")) == 422  # direct: refused
    # An indirect cycle binds (each name exists when registered): a -> b -> a -> ...
    assert post_yaml(client, CHILD.replace("name: child", "name: a")) == 201
    assert post_yaml(client, CALLER.format(name="b", callee="a")) == 201
    assert post_yaml(client, CALLER.format(name="a", callee="b")) == 201
    run = client.post("/v1/pipelines/a/runs", json={}).json()
    assert (run["status"], run["failed_step"]) == ("failed", "again")
    assert f"deeper than {MAX_PIPELINE_DEPTH}" in run["error"]
