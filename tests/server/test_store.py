"""The store on SQLite and PostgreSQL: versions, runs, steps, statistics, audit, migrations."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from alembic import command
from sqlalchemy import inspect

from planner.spec import PipelineSpec
from server.db import alembic_config, downgrade, make_engine, upgrade
from server.errors import PipelineNotFoundError, RunNotFoundError
from server.store import RunChange, StepChange, Store, content_hash

TABLES = {"pipelines", "runs", "step_runs", "statistics", "audit", "alembic_version"}


def spec(name: str = "demo", **changes: object) -> PipelineSpec:
    """A small valid spec; `changes` replace top-level fields."""
    raw = {
        "name": name,
        "steps": {"sum": {"tool": "calc", "args": {"expression": "1 + 1"}}},
        "outputs": {"sum": "{{ steps.sum.output }}"},
        **changes,
    }
    return msgspec.convert(raw, PipelineSpec)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated, empty store."""
    s = Store.open(database_url)
    yield s
    s.dispose()


def test_versions_count_up_per_name_and_identical_content_is_idempotent(store: Store) -> None:
    first, created = store.register_pipeline(spec(), text="a", fmt="yaml", actor="t")
    assert (first.version, created) == (1, True)
    again, created = store.register_pipeline(spec(), text="a, reformatted", fmt="json", actor="t")
    assert (again.version, again.content_hash, created) == (1, first.content_hash, False)
    second, created = store.register_pipeline(
        spec(description="changed"), text="b", fmt="yaml", actor="t"
    )
    assert (second.version, created) == (2, True)
    other, _ = store.register_pipeline(spec("other"), text="c", fmt="yaml", actor="t")
    assert other.version == 1
    # Going back to old content finds the old version rather than making a third.
    assert store.register_pipeline(spec(), text="a", fmt="yaml", actor="t")[0].version == 1

    assert [(p.name, p.version) for p in store.latest_pipelines()] == [("demo", 2), ("other", 1)]
    assert [p.version for p in store.pipeline_versions("demo")] == [1, 2]
    assert store.get_pipeline("demo").spec_text == "b"
    assert store.get_pipeline("demo", 1).spec_text == "a"
    assert store.get_pipeline("demo").created_at.tzinfo is not None


def test_unknown_pipelines_and_runs(store: Store) -> None:
    with pytest.raises(PipelineNotFoundError, match="'nope'"):
        store.get_pipeline("nope")
    store.register_pipeline(spec(), text="a", fmt="yaml", actor="t")
    with pytest.raises(PipelineNotFoundError, match="version 7"):
        store.get_pipeline("demo", 7)
    with pytest.raises(PipelineNotFoundError):
        store.pipeline_versions("nope")
    with pytest.raises(RunNotFoundError):
        store.get_run("no-such-run")
    with pytest.raises(RunNotFoundError):
        store.apply("no-such-run", [RunChange(values={"status": "running"})])


def test_content_hash_ignores_formatting_not_content() -> None:
    assert content_hash(spec()) == content_hash(spec())
    assert content_hash(spec()) != content_hash(spec(description="x"))
    assert len(content_hash(spec())) == 64


def test_declared_version_and_commit_are_kept(store: Store) -> None:
    record, _ = store.register_pipeline(
        spec(version="1.2.0"), text="a", fmt="yaml", actor="t", commit="abc123"
    )
    assert (record.declared_version, record.commit) == ("1.2.0", "abc123")


def test_concurrent_registrations_agree_on_versions(store: Store) -> None:
    specs = [spec(description=str(i % 3)) for i in range(9)]
    results: list[int] = []
    errors: list[Exception] = []

    def register(s: PipelineSpec) -> None:
        try:
            results.append(store.register_pipeline(s, text="x", fmt="yaml", actor="t")[0].version)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=register, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == len(specs)
    assert sorted(set(results)) == [1, 2, 3]
    assert [p.version for p in store.pipeline_versions("demo")] == [1, 2, 3]


def _run(store: Store, inputs: dict[str, object] | None = None) -> str:
    record, _ = store.register_pipeline(spec(), text="a", fmt="yaml", actor="t")
    run_id = str(uuid.uuid4())
    queued = store.create_run(run_id, record, inputs or {"q": "hi"}, actor="tester")
    assert (queued.status, queued.version, queued.content_hash) == (
        "queued",
        1,
        record.content_hash,
    )
    return run_id


def test_a_run_records_its_steps_outputs_and_json(store: Store) -> None:
    run_id = _run(store, {"q": "hi", "n": [1, {"deep": None}]})
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    store.apply(
        run_id,
        [
            RunChange(values={"status": "running", "started_at": t0}),
            StepChange(step="sum", values={"status": "running", "attempts": 1}),
            StepChange(step="skipped", values={"status": "skipped", "skip_reason": "when false"}),
        ],
    )
    store.apply(
        run_id,
        [
            StepChange(
                step="sum",
                values={
                    "status": "succeeded",
                    "output": {"a": [1, 2.5, "x", None]},
                    "tokens": 7,
                    "duration_s": 0.25,
                    "model": "demo-base",
                },
            ),
            RunChange(
                values={
                    "status": "succeeded",
                    "outputs": {"sum": 2},
                    "total_tokens": 7,
                    "finished_at": t0,
                }
            ),
        ],
    )
    run = store.get_run(run_id)
    assert (run.status, run.outputs, run.total_tokens, run.inputs) == (
        "succeeded",
        {"sum": 2},
        7,
        {"q": "hi", "n": [1, {"deep": None}]},
    )
    assert run.started_at == t0 and run.started_at.tzinfo is not None
    steps = {s.step: s for s in run.steps}
    assert steps["sum"].output == {"a": [1, 2.5, "x", None]}
    assert (steps["sum"].attempts, steps["sum"].tokens, steps["sum"].model) == (1, 7, "demo-base")
    assert (steps["skipped"].status, steps["skipped"].skip_reason) == ("skipped", "when false")


def test_dynamic_step_ids_longer_than_an_identifier_are_kept(store: Store) -> None:
    # a plan task is `<step>.<round>.<line>`: a 64-character step id makes a longer one
    step = "s" * 64 + ".12.planner"
    run_id = _run(store, {"q": "hi"})
    store.apply(
        run_id,
        [
            StepChange(step=step, values={"status": "failed", "attempts": 1}),
            RunChange(values={"status": "failed", "failed_step": step, "error": "boom"}),
        ],
    )
    run = store.get_run(run_id)
    assert run.failed_step == step and [s.step for s in run.steps] == [step]


def test_listing_runs_newest_first_with_filters(store: Store) -> None:
    ids = [_run(store) for _ in range(3)]
    store.apply(
        ids[1], [RunChange(values={"status": "failed", "error": "boom", "failed_step": "sum"})]
    )
    assert [r.id for r in store.list_runs()] == ids[::-1]
    assert [r.id for r in store.list_runs(status="failed")] == [ids[1]]
    assert [r.id for r in store.list_runs(pipeline="demo", limit=2)] == ids[:0:-1]
    assert store.list_runs(pipeline="other") == []
    failed = store.get_run(ids[1])
    assert (failed.error, failed.failed_step) == ("boom", "sum")


def test_cancel_unfinished_leaves_finished_runs_alone(store: Store) -> None:
    done, running = _run(store), _run(store)
    store.apply(done, [RunChange(values={"status": "succeeded"})])
    store.apply(running, [RunChange(values={"status": "running"})])
    store.cancel_unfinished([done, running], "server shut down")
    assert store.get_run(done).status == "succeeded"
    cancelled = store.get_run(running)
    assert (cancelled.status, cancelled.error) == ("cancelled", "server shut down")
    assert cancelled.finished_at is not None


def test_analyze_keeps_running_means_per_model_tool_and_step(store: Store) -> None:
    for latency, tokens, status in (
        (1.0, 10, "succeeded"),
        (3.0, 30, "succeeded"),
        (9.0, 99, "failed"),
    ):
        run_id = _run(store)
        store.apply(
            run_id,
            [
                StepChange(
                    step="sum", values={"status": status, "duration_s": latency, "tokens": tokens}
                ),
                StepChange(
                    step="gen",
                    values={
                        "status": status,
                        "duration_s": latency,
                        "tokens": tokens,
                        "model": "demo-base",
                    },
                ),
                StepChange(step="skip", values={"status": "skipped"}),
            ],
        )
        store.analyze_run(run_id, {"sum": "tool:calc", "gen": "model:alias-target"})
    stats = {s.key: s for s in store.statistics()}
    assert set(stats) == {"tool:calc", "model:demo-base", "step:demo/sum", "step:demo/gen"}
    for key, s in stats.items():
        assert (s.count, s.failures) == (3, 1), key
        assert s.mean_latency_s == pytest.approx(2.0) and s.mean_tokens == pytest.approx(20.0)


def test_audit_records_registrations_and_runs(store: Store) -> None:
    run_id = _run(store)
    store.audit("cli", "custom", "thing", {"k": 1})
    log = store.audit_log()
    assert [(a.action, a.actor) for a in log] == [
        ("custom", "cli"),
        ("run.create", "tester"),
        ("pipeline.register", "t"),
    ]
    assert log[1].subject == f"run:{run_id}" and log[1].detail == {"pipeline": "demo", "version": 1}
    assert log[2].subject == "pipeline:demo@1"


def test_migrations_upgrade_downgrade_and_match_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) == TABLES
        upgrade(engine)  # a second start finds nothing to do
        config = alembic_config(database_url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.check(config)  # raises when the models and migrations disagree
        downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) == TABLES
    finally:
        engine.dispose()


def _held(store: Store, instance: str, *, status: str = "running", age_s: float = 0) -> str:
    """A run held by `instance`, in `status`, whose lease was last renewed `age_s` ago."""
    record, _ = store.register_pipeline(spec(), text="a", fmt="yaml", actor="t")
    run_id = str(uuid.uuid4())
    store.create_run(run_id, record, {}, actor="t", instance=instance)
    values = {"status": status, "heartbeat_at": datetime.now(UTC) - timedelta(seconds=age_s)}
    store.apply(
        run_id,
        [
            RunChange(values=values),
            StepChange(step="done", values={"status": "succeeded"}),
            StepChange(step="going", values={"status": "running"}),
        ],
    )
    return run_id


def test_runs_of_a_dead_server_fail_once_their_lease_expires(store: Store) -> None:
    dead = _held(store, "dead", age_s=120)
    queued = _held(store, "dead", status="queued", age_s=120)
    alive = _held(store, "alive", age_s=5)
    finished = _held(store, "dead", status="succeeded", age_s=120)
    mine = _held(store, "me", age_s=120)  # the sweeper's own runs are its to finish
    assert sorted(store.fail_abandoned(lease_s=30, instance="me")) == sorted([dead, queued])
    assert store.fail_abandoned(lease_s=30, instance="me") == []  # exactly once
    failed = store.get_run(dead)
    assert failed.status == "failed" and "stopped renewing its lease" in (failed.error or "")
    assert failed.finished_at is not None
    steps = {s.step: s.status for s in failed.steps}
    assert steps == {"done": "succeeded", "going": "failed"}
    for run_id, status in ((alive, "running"), (finished, "succeeded"), (mine, "running")):
        assert store.get_run(run_id).status == status
    assert store.renew_leases("alive") == 1 and store.renew_leases("dead") == 0
    assert store.fail_abandoned(lease_s=4) == [mine]  # no instance given: nobody is spared
    assert any(a.action == "run.abandoned" for a in store.audit_log())


def test_renewed_leases_do_not_expire(store: Store) -> None:
    run_id = _held(store, "alive", age_s=120)
    assert store.renew_leases("alive") == 1
    assert store.fail_abandoned(lease_s=30) == []
    assert store.get_run(run_id).status == "running"
