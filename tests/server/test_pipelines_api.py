"""`/v1/pipelines` and `/v1/runs` end to end: the tiny checkpoint serves as the demo model."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from engine import Engine
from server.app import create_app
from server.config import LimitsConfig, ServerConfig
from server.runs import CANCEL_REASON, SHUTDOWN_REASON
from server.store import Change, RunChange, RunRecord

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (REPO / "pipelines").glob("*.yaml"))
YAML = {"content-type": "application/yaml"}
Client = TestClient[Litestar]

SPEC = """\
name: {name}
inputs:
  q: {{type: string, maxLength: 100}}
models: {{m: demo-base}}
tools: [calc]
steps:
  two:
    tool: calc
    args: {{expression: "1 + 1"}}
  say:
    generate: {{model: m, prompt: "Q: {{{{ inputs.q }}}} {{{{ steps.two.output }}}}", max_tokens: 4}}
outputs:
  two: "{{{{ steps.two.output }}}}"
  say: "{{{{ steps.say.output }}}}"
"""
# Fifty sequential generations: long enough to cancel while it runs.
SLOW_SPEC = """\
name: {name}
models: {{m: demo-base}}
steps:
  many:
    map: "range(50)"
    concurrency: 1
    generate: {{model: m, prompt: "count {{{{ item }}}}", max_tokens: 200}}
outputs:
  many: "{{{{ steps.many.output }}}}"
"""


def unique(prefix: str = "p") -> str:
    """A pipeline name no other test uses (the module shares one database)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def problems(response: Any, status: int = 422) -> list[dict[str, Any]]:
    """The `errors` list of a problems response, after checking its shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "errors"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == body["errors"][0]["path"]
    return body["errors"]


def error(response: Any, status: int, code: str | None) -> dict[str, Any]:
    """The OpenAI-shaped error object of a response, after checking status and code."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code
    return body


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """`(event, data)` pairs of an event stream."""
    pairs = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        pairs.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return pairs


def config_for(tmp: Path, database_url: str | None = None, **limits: Any) -> ServerConfig:
    """Shipped pipelines, a scratch database, the given limits."""
    return ServerConfig(
        database_url=database_url or f"sqlite:///{tmp / 'compound.db'}",
        pipelines_dir=str(REPO / "pipelines"),
        limits=LimitsConfig(**limits),
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, demo_engine: Engine) -> Iterator[Client]:
    """One app for the module (tests use their own pipeline names), small spec limit."""
    config = config_for(tmp_path_factory.mktemp("api"), max_spec_bytes=4096)
    with TestClient(create_app(config, demo_engine)) as c:
        yield c


def register(client: Client, name: str, spec: str = SPEC) -> dict[str, Any]:
    """Register a YAML spec; the answer's body."""
    response = client.post("/v1/pipelines", content=spec.format(name=name), headers=YAML)
    assert response.status_code in (200, 201), response.text
    return response.json()


def wait_finished(client: Client, run_id: str, timeout_s: float = 20) -> dict[str, Any]:
    """Poll a run until it is no longer queued or running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(0.05)
    pytest.fail(f"run {run_id} did not finish")


# -- registration --------------------------------------------------------------------------------


def test_shipped_pipelines_are_registered_at_startup(client: Client) -> None:
    listed = {p["name"]: p for p in client.get("/v1/pipelines").json()["pipelines"]}
    assert set(SHIPPED) <= set(listed)
    assert listed["ticket-triage"]["version"] == 1
    assert listed["ticket-triage"]["declared_version"] == "1.0.0"


def test_register_yaml_then_json_versions_and_idempotence(client: Client) -> None:
    name = unique()
    created = client.post("/v1/pipelines", content=SPEC.format(name=name), headers=YAML)
    assert created.status_code == 201
    first = created.json()
    assert (first["name"], first["version"], first["created"]) == (name, 1, True)
    assert len(first["content_hash"]) == 64

    again = client.post("/v1/pipelines", content=SPEC.format(name=name), headers=YAML)
    assert again.status_code == 200 and again.json() == {**first, "created": False}

    # The same content as JSON is the same version: the hash is of the parsed spec.
    as_json = client.get(f"/v1/pipelines/{name}").json()["spec"]
    same = client.post("/v1/pipelines", json=as_json)
    assert same.status_code == 200 and same.json()["version"] == 1

    changed = client.post("/v1/pipelines", json={**as_json, "description": "now with words"})
    assert changed.status_code == 201 and changed.json()["version"] == 2

    versions = client.get(f"/v1/pipelines/{name}/versions").json()
    assert [v["version"] for v in versions["versions"]] == [1, 2]
    latest = client.get(f"/v1/pipelines/{name}").json()
    assert (latest["version"], latest["spec_format"]) == (2, "json")
    assert latest["spec"]["description"] == "now with words"
    old = client.get(f"/v1/pipelines/{name}/versions/1").json()
    assert (old["version"], old["spec_format"], old["spec_text"]) == (
        1,
        "yaml",
        SPEC.format(name=name),
    )
    names = {p["name"]: p["version"] for p in client.get("/v1/pipelines").json()["pipelines"]}
    assert names[name] == 2


def test_invalid_specs_get_422_with_every_problem_located(client: Client) -> None:
    bad = "name: broken\nsteps:\n  a:\n    tool: calc\n    colour: red\noutputs: {x: '{{ steps.nope.output }}'}\n"
    found = problems(client.post("/v1/pipelines", content=bad, headers=YAML))
    assert any(p["path"] == "/steps/a/colour" and p["line"] == 5 for p in found), found
    assert all(set(p) == {"path", "message", "line", "column"} for p in found)


def test_unbound_names_are_plan_errors_with_pointers(client: Client) -> None:
    spec = SPEC.format(name=unique()).replace("m: demo-base", "m: no-such-model")
    (problem,) = problems(client.post("/v1/pipelines", content=spec, headers=YAML))
    assert problem["path"] == "/models/m" and "no-such-model" in problem["message"]
    assert problem["line"] == 4
    body = client.post("/v1/pipelines", content=spec, headers=YAML).json()
    assert body["error"]["code"] == "invalid_plan"


def test_malformed_yaml_and_json_are_422(client: Client) -> None:
    assert problems(client.post("/v1/pipelines", content="name: [", headers=YAML))
    broken = client.post(
        "/v1/pipelines", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    assert problems(broken)


def test_spec_and_body_limits(client: Client) -> None:
    padded = SPEC.format(name=unique()) + "#" * 5000 + "\n"
    error(client.post("/v1/pipelines", content=padded, headers=YAML), 413, "too_large")
    huge = b"#" * (2 << 20)
    assert client.post("/v1/pipelines", content=huge, headers=YAML).status_code == 413
    error(
        client.post("/v1/pipelines", content="<html/>", headers={"content-type": "text/html"}),
        415,
        "media_type",
    )


def test_unknown_pipelines_versions_and_runs_are_404(client: Client) -> None:
    error(client.get("/v1/pipelines/nope"), 404, "pipeline_not_found")
    error(client.get("/v1/pipelines/nope/versions"), 404, "pipeline_not_found")
    error(client.get("/v1/pipelines/ticket-triage/versions/99"), 404, "pipeline_not_found")
    error(client.post("/v1/pipelines/nope/explain", json={}), 404, "pipeline_not_found")
    error(client.post("/v1/pipelines/nope/runs", json={}), 404, "pipeline_not_found")
    error(client.get("/v1/runs/nope"), 404, "run_not_found")
    error(client.post("/v1/runs/nope/cancel"), 404, "run_not_found")


# -- explain -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json", "mermaid"])
def test_explain_formats(client: Client, fmt: str) -> None:
    response = client.post("/v1/pipelines/city-density/explain", json={"format": fmt})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["version"], body["format"]) == ("city-density", 1, fmt)
    plan = body["plan"]
    if fmt == "json":
        assert isinstance(plan, dict)
    else:
        assert plan.startswith("Plan city-density" if fmt == "text" else "flowchart")


def test_explain_rejects_unknown_fields(client: Client) -> None:
    response = client.post("/v1/pipelines/city-density/explain", json={"format": "dot"})
    assert response.status_code == 400


# -- runs ----------------------------------------------------------------------------------------


def test_run_and_wait_records_everything(client: Client) -> None:
    name = unique()
    registered = register(client, name)
    response = client.post(f"/v1/pipelines/{name}/runs", json={"inputs": {"q": "hi"}})
    assert response.status_code == 200, response.text
    run = response.json()
    assert (run["status"], run["pipeline"], run["version"]) == ("succeeded", name, 1)
    assert run["content_hash"] == registered["content_hash"]
    assert run["outputs"]["two"] == 2 and isinstance(run["outputs"]["say"], str)
    steps = {s["step"]: s for s in run["steps"]}
    assert (steps["two"]["status"], steps["two"]["output"], steps["two"]["attempts"]) == (
        "succeeded",
        2,
        1,
    )
    assert steps["say"]["model"] == "demo-base" and steps["say"]["tokens"] > 0
    assert run["duration_s"] >= 0 and run["total_tokens"] >= steps["say"]["tokens"]
    assert client.get(f"/v1/runs/{run['run_id']}").json() == run


def test_run_in_the_background(client: Client) -> None:
    name = unique()
    register(client, name)
    response = client.post(f"/v1/pipelines/{name}/runs", json={"inputs": {"q": "x"}, "wait": False})
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] == "queued"
    run = wait_finished(client, accepted["run_id"])
    assert run["status"] == "succeeded" and run["outputs"]["two"] == 2


def test_run_streams_events(client: Client) -> None:
    name = unique()
    register(client, name)
    response = client.post(
        f"/v1/pipelines/{name}/runs", json={"inputs": {"q": "x"}, "stream": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = sse(response.text)
    kinds = [k for k, _ in stream]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert {"step_started", "step_finished", "token_delta"} <= set(kinds)
    assert all(data["type"] == kind for kind, data in stream)
    run_id = stream[0][1]["run_id"]
    deltas = "".join(d["text"] for k, d in stream if k == "token_delta")
    run = wait_finished(client, run_id)
    assert run["status"] == "succeeded" and run["outputs"]["say"] == deltas


def test_a_failed_run_is_stored_with_its_error_and_step(client: Client) -> None:
    response = client.post("/v1/pipelines/city-facts/runs", json={"inputs": {}})
    assert response.status_code == 200
    run = response.json()
    assert (run["status"], run["failed_step"]) == ("failed", "facts")
    assert "not valid JSON" in run["error"]
    steps = {s["step"]: s for s in run["steps"]}
    assert steps["describe"]["status"] == "succeeded"
    assert (steps["facts"]["status"], steps["facts"]["attempts"]) == ("failed", 3)
    assert "not valid JSON" in steps["facts"]["error"]
    assert run["inputs"] == {"city": "Elsamzix"}  # the declared default, as the run saw it
    listed = client.get("/v1/runs", params={"pipeline": "city-facts", "status": "failed"}).json()
    assert run["run_id"] in [r["run_id"] for r in listed["runs"]]


def test_route_branches_not_taken_are_stored_as_skipped(client: Client) -> None:
    run = client.post(
        "/v1/pipelines/ticket-triage/runs", json={"inputs": {"ticket": "The site is down."}}
    ).json()
    assert run["status"] == "succeeded"
    statuses = {s["step"]: s["status"] for s in run["steps"]}
    assert sorted(statuses.values()).count("skipped") == 2
    skipped = [s for s in run["steps"] if s["status"] == "skipped"]
    assert all("route 'triage' chose" in s["skip_reason"] for s in skipped)


def test_invalid_inputs_are_422_with_a_pointer_and_store_nothing(client: Client) -> None:
    name = unique()
    register(client, name)
    (problem,) = problems(client.post(f"/v1/pipelines/{name}/runs", json={"inputs": {"q": 3}}))
    assert problem["path"] == "/inputs/q"
    (problem,) = problems(client.post(f"/v1/pipelines/{name}/runs", json={"inputs": {}}))
    assert problem["path"] == "/inputs/q" and "missing" in problem["message"]
    assert client.get("/v1/runs", params={"pipeline": name}).json()["runs"] == []


def test_run_body_is_validated(client: Client) -> None:
    response = client.post("/v1/pipelines/city-density/runs", json={"inputs": {}, "wiat": False})
    assert response.status_code == 400


def test_runs_listing_newest_first_with_filters(client: Client) -> None:
    name = unique()
    register(client, name)
    ids = [
        client.post(f"/v1/pipelines/{name}/runs", json={"inputs": {"q": str(i)}}).json()["run_id"]
        for i in range(3)
    ]
    listed = client.get("/v1/runs", params={"pipeline": name}).json()["runs"]
    assert [r["run_id"] for r in listed] == ids[::-1]
    assert all(r["steps"] == [] for r in listed)
    assert len(client.get("/v1/runs", params={"pipeline": name, "limit": 2}).json()["runs"]) == 2
    assert (
        client.get("/v1/runs", params={"pipeline": name, "status": "failed"}).json()["runs"] == []
    )
    assert client.get("/v1/runs", params={"limit": 0}).status_code == 400
    assert client.get("/v1/runs", params={"status": "weird"}).status_code == 400


def test_explain_analyze_of_a_run(client: Client) -> None:
    run = client.post("/v1/pipelines/city-density/runs", json={"inputs": {}}).json()
    text = client.get(f"/v1/runs/{run['run_id']}/explain").json()["plan"]
    assert text.count("| actual ") == len(run["steps"]) == 5
    body = client.get(f"/v1/runs/{run['run_id']}/explain", params={"format": "json"}).json()
    assert (body["name"], body["version"], body["format"]) == ("city-density", 1, "json")
    assert "actual" in json.dumps(body["plan"])
    error(client.get("/v1/runs/nope/explain"), 404, "run_not_found")


def test_runs_update_statistics_and_audit(client: Client) -> None:
    name = unique()
    register(client, name)
    client.post(f"/v1/pipelines/{name}/runs", json={"inputs": {"q": "a"}})
    service = client.app.state.pipelines
    stats = {s.key: s for s in service.store.statistics()}
    assert stats[f"step:{name}/two"].count == 1
    assert stats["tool:calc"].count >= 1 and stats["model:demo-base"].count >= 1
    assert service.stats.step(name, "two") is not None
    actions = [(a.action, a.subject) for a in service.store.audit_log(limit=1000)]
    assert ("pipeline.register", f"pipeline:{name}@1") in actions
    assert any(action == "run.create" for action, _ in actions)


def run_statuses(client: Client, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Run id -> every status written to its row from now on, in order."""
    store = client.app.state.pipelines.store
    written: dict[str, list[str]] = {}
    apply = store.apply

    def recording(run_id: str, changes: list[Change]) -> None:
        apply(run_id, changes)
        for change in changes:
            if isinstance(change, RunChange) and "status" in change.values:
                written.setdefault(run_id, []).append(change.values["status"])

    monkeypatch.setattr(store, "apply", recording)
    return written


def test_cancel_a_running_run(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("slow")
    register(client, name, SLOW_SPEC)
    written = run_statuses(client, monkeypatch)
    run_id = client.post(f"/v1/pipelines/{name}/runs", json={"wait": False}).json()["run_id"]
    assert client.post(f"/v1/runs/{run_id}/cancel").status_code == 202
    run = wait_finished(client, run_id)
    assert (run["status"], run["error"]) == ("cancelled", CANCEL_REASON)
    assert run["finished_at"] is not None
    # Never shown as ended any other way first, not even for a moment.
    assert written[run_id] == ["running", "cancelled"]
    audit = client.app.state.pipelines.store.audit_log(limit=5)
    assert ("run.cancel", f"run:{run_id}") in [(a.action, a.subject) for a in audit]


def start_and_cancel(client: Client, name: str, *reasons: str) -> RunRecord:
    """Start a run of `name`, cancel it (once per reason) before its task gets to run, and
    wait for it."""
    service = client.app.state.pipelines

    async def go() -> RunRecord:
        active = await service.start_run(name, None, {}, actor="test")
        for reason in reasons:
            assert service.runs.cancel(active.run_id, reason)
        return await active.wait()

    return client.blocking_portal.call(go)


def test_cancel_a_queued_run(client: Client) -> None:
    name = unique("slow")
    register(client, name, SLOW_SPEC)
    waited = start_and_cancel(client, name, CANCEL_REASON)
    assert (waited.status, waited.error) == ("cancelled", CANCEL_REASON)
    run = client.get(f"/v1/runs/{waited.id}").json()
    assert (run["status"], run["error"]) == ("cancelled", CANCEL_REASON)
    assert run["started_at"] is None and run["finished_at"] is not None
    assert waited.id not in client.app.state.pipelines.runs.active


def test_the_first_cancel_reason_wins(client: Client) -> None:
    name = unique("slow")
    register(client, name, SLOW_SPEC)
    waited = start_and_cancel(client, name, CANCEL_REASON, SHUTDOWN_REASON)
    assert (waited.status, waited.error) == ("cancelled", CANCEL_REASON)


# -- lifecycle -----------------------------------------------------------------------------------


def test_shutdown_cancels_running_runs(tmp_path: Path, demo_engine: Engine) -> None:
    config = config_for(tmp_path)
    name = unique("slow")
    with TestClient(create_app(config, demo_engine)) as c:
        register(c, name, SLOW_SPEC)
        run_id = c.post(f"/v1/pipelines/{name}/runs", json={"wait": False}).json()["run_id"]
    with TestClient(create_app(config, demo_engine)) as c:
        run = c.get(f"/v1/runs/{run_id}").json()
    assert (run["status"], run["error"]) == ("cancelled", SHUTDOWN_REASON)


def test_a_broken_shipped_spec_is_logged_and_skipped(
    tmp_path: Path, demo_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "good.yaml").write_text(SPEC.format(name="good"))
    (folder / "broken.yaml").write_text("name: broken\nsteps: {}\n")
    (folder / "unbound.yaml").write_text(SPEC.format(name="unbound").replace("demo-base", "gone"))
    config = msgspec.structs.replace(config_for(tmp_path), pipelines_dir=str(folder))
    with caplog.at_level(logging.ERROR), TestClient(create_app(config, demo_engine)) as c:
        names = [p["name"] for p in c.get("/v1/pipelines").json()["pipelines"]]
    assert names == ["good"]
    assert "broken.yaml: skipped" in caplog.text and "unbound.yaml: skipped" in caplog.text


def test_database_persists_across_restarts_on_sqlite_and_postgresql(
    tmp_path: Path, demo_engine: Engine, database_url: str
) -> None:
    config = config_for(tmp_path, database_url)
    name = unique()
    with TestClient(create_app(config, demo_engine)) as c:
        register(c, name)
        run_id = c.post(f"/v1/pipelines/{name}/runs", json={"inputs": {"q": "x"}}).json()["run_id"]
    with TestClient(create_app(config, demo_engine)) as c:
        assert c.get(f"/v1/pipelines/{name}").json()["version"] == 1
        run = c.get(f"/v1/runs/{run_id}").json()
        assert run["status"] == "succeeded" and run["outputs"]["two"] == 2
        # Shipped specs were registered once: the second start found identical content.
        assert c.get("/v1/pipelines/ticket-triage/versions").json()["versions"][-1]["version"] == 1
