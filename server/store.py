"""Persistence of pipelines, runs, step runs, statistics and the audit log.

`Store` is synchronous SQLAlchemy; each method is one transaction, and the async server calls
it in a worker thread. What it returns are frozen msgspec records, detached from any session.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec
from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from planner.spec import PipelineSpec
from server.db import (
    AuditRow,
    PipelineRow,
    RunRow,
    StatisticRow,
    StepRunRow,
    make_engine,
    upgrade,
    utcnow,
)
from server.errors import PipelineNotFoundError, RunNotFoundError

RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
STEP_FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "skipped"})
ABANDONED_REASON = (
    "abandoned: the server process running it stopped renewing its lease (it crashed or was "
    "killed); run it again"
)
MAX_LIST = 1000
# Concurrent registrations of one name race for the next version number; the losers retry.
REGISTER_ATTEMPTS = 16
MIN_SHORT_SHA = 7  # git's own default abbreviation
_RECORD = {"frozen": True, "kw_only": True}


class PipelineRecord(msgspec.Struct, **_RECORD):
    """One registered version of a pipeline."""

    name: str
    version: int
    content_hash: str
    spec_text: str
    spec_format: str
    declared_version: str | None
    commit: str | None
    created_at: datetime


class Resolved(msgspec.Struct, **_RECORD):
    """A pipeline reference resolved to exact content: the stored version, what was asked for
    (`ref`), and where the content was read from (`commit` and `path` in the git registry)."""

    record: PipelineRecord
    ref: str
    commit: str | None = None
    path: str | None = None

    @classmethod
    def of(cls, record: PipelineRecord, ref: str) -> Resolved:
        """A stored version reached without git (its commit, if any, as registered)."""
        return cls(record=record, ref=ref, commit=record.commit)


class Provenance(msgspec.Struct, **_RECORD):
    """What a run records besides the pipeline version: the requested ref, the commit its spec
    was read from, and the run it repeats."""

    ref: str | None = None
    commit: str | None = None
    rerun_of: str | None = None


class StepRecord(msgspec.Struct, **_RECORD):
    """One step of a stored run."""

    step: str
    status: str
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    tokens: int
    model: str | None
    cached: bool
    error: str | None
    skip_reason: str | None
    output: Any
    output_truncated: bool


class RunRecord(msgspec.Struct, **_RECORD):
    """A stored run; `steps` is filled by `get_run`, empty in listings."""

    id: str
    pipeline: str
    version: int
    content_hash: str
    commit: str | None
    ref: str | None
    rerun_of: str | None
    status: str
    inputs: Any
    outputs: Any
    error: str | None
    failed_step: str | None
    total_tokens: int
    prompt_tokens: int  # of total_tokens
    completion_tokens: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    sub_pipelines: list[dict[str, Any]] = []  # what its `pipeline` steps resolved to
    steps: list[StepRecord] = []


class StatRecord(msgspec.Struct, **_RECORD):
    """Figures of one model, tool or step over past runs."""

    key: str
    count: int
    failures: int
    mean_latency_s: float
    mean_tokens: float


class AuditRecord(msgspec.Struct, **_RECORD):
    """One audit log entry."""

    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


class StepChange(msgspec.Struct, **_RECORD):
    """New column values of one step run (created on first change)."""

    step: str
    values: dict[str, Any]


class RunChange(msgspec.Struct, **_RECORD):
    """New column values of the run itself."""

    values: dict[str, Any]


Change = StepChange | RunChange


def content_hash(spec: PipelineSpec) -> str:
    """sha256 of the spec's canonical JSON: YAML and JSON texts of the same spec hash alike."""
    canonical = json.dumps(
        msgspec.to_builtins(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Store:
    """The database behind the server; one instance per process, safe across threads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._session = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect to `url` and migrate the database to the newest schema."""
        engine = make_engine(url)
        upgrade(engine)
        return cls(engine)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- pipelines -------------------------------------------------------------------------------

    def register_pipeline(
        self,
        spec: PipelineSpec,
        *,
        text: str,
        fmt: str,
        actor: str,
        commit: str | None = None,
    ) -> tuple[PipelineRecord, bool]:
        """Store a new version of `spec.name`, or return the version with identical content;
        the flag is True when a version was created."""
        digest = content_hash(spec)
        for _ in range(REGISTER_ATTEMPTS - 1):
            try:
                return self._register(spec, digest, text=text, fmt=fmt, actor=actor, commit=commit)
            except IntegrityError:
                # Another writer took this version number (or stored this content) first:
                # look again; the next attempt finds its row or the next free number.
                continue
        return self._register(spec, digest, text=text, fmt=fmt, actor=actor, commit=commit)

    def _register(
        self,
        spec: PipelineSpec,
        digest: str,
        *,
        text: str,
        fmt: str,
        actor: str,
        commit: str | None,
    ) -> tuple[PipelineRecord, bool]:
        with self._session.begin() as session:
            same = session.scalar(
                select(PipelineRow).where(
                    PipelineRow.name == spec.name, PipelineRow.content_hash == digest
                )
            )
            if same is not None:
                return _pipeline(same), False
            latest = session.scalar(
                select(func.max(PipelineRow.version)).where(PipelineRow.name == spec.name)
            )
            row = PipelineRow(
                name=spec.name,
                version=(latest or 0) + 1,
                spec_text=text,
                spec_format=fmt,
                content_hash=digest,
                declared_version=spec.version,
                commit=commit,
            )
            session.add(row)
            session.flush()
            _audit(
                session,
                actor,
                "pipeline.register",
                f"pipeline:{row.name}@{row.version}",
                {"content_hash": digest, "commit": commit},
            )
            return _pipeline(row), True

    def get_pipeline(self, name: str, version: int | None = None) -> PipelineRecord:
        """Version `version` of `name`, or its latest; `PipelineNotFoundError` otherwise."""
        query = select(PipelineRow).where(PipelineRow.name == name)
        if version is not None:
            query = query.where(PipelineRow.version == version)
        with self._session() as session:
            row = session.scalar(query.order_by(PipelineRow.version.desc()).limit(1))
        if row is None:
            raise PipelineNotFoundError(name, version)
        return _pipeline(row)

    def resolve(self, ref: str) -> PipelineRecord:
        """`name` (the latest), `name@<n>` (version n), or `name@<label>`: the newest version
        whose spec declares `version: <label>` or whose commit starts with `<label>`."""
        name, _, label = ref.partition("@")
        if not label:
            return self.get_pipeline(name)
        if label.isdigit():
            return self.get_pipeline(name, int(label))
        query = (
            select(PipelineRow)
            .where(
                PipelineRow.name == name,
                (PipelineRow.declared_version == label)
                | PipelineRow.commit.startswith(label, autoescape=True),
            )
            .order_by(PipelineRow.version.desc())
            .limit(1)
        )
        with self._session() as session:
            row = session.scalar(query)
        if row is None:
            raise PipelineNotFoundError(ref)
        return _pipeline(row)

    def pipeline_by_hash(self, name: str, digest: str) -> PipelineRecord:
        """The version of `name` whose content hash is `digest` (there is at most one)."""
        with self._session() as session:
            row = session.scalar(
                select(PipelineRow).where(
                    PipelineRow.name == name, PipelineRow.content_hash == digest
                )
            )
        if row is None:
            raise PipelineNotFoundError(name, reason=f"no version with content hash {digest}")
        return _pipeline(row)

    def run_commit(self, name: str, prefix: str) -> tuple[PipelineRecord, str] | None:
        """The stored spec and full commit of the newest run of `name` whose recorded commit
        starts with `prefix` (at least 7 hex digits); None when no run recorded one."""
        if len(prefix) < MIN_SHORT_SHA or any(c not in "0123456789abcdef" for c in prefix):
            return None
        query = (
            select(RunRow.content_hash, RunRow.commit)
            .where(RunRow.pipeline == name, RunRow.commit.startswith(prefix, autoescape=True))
            .order_by(RunRow.created_at.desc())
            .limit(1)
        )
        with self._session() as session:
            found = session.execute(query).first()
        if found is None or found.commit is None:
            return None
        return self.pipeline_by_hash(name, found.content_hash), found.commit

    def pipeline_versions(self, name: str) -> list[PipelineRecord]:
        """Every version of `name`, oldest first; `PipelineNotFoundError` when there is none."""
        with self._session() as session:
            rows = session.scalars(
                select(PipelineRow).where(PipelineRow.name == name).order_by(PipelineRow.version)
            ).all()
        if not rows:
            raise PipelineNotFoundError(name)
        return [_pipeline(r) for r in rows]

    def latest_pipelines(self) -> list[PipelineRecord]:
        """The latest version of every pipeline, by name."""
        newest = (
            select(PipelineRow.name, func.max(PipelineRow.version).label("version"))
            .group_by(PipelineRow.name)
            .subquery()
        )
        query = (
            select(PipelineRow)
            .join(
                newest,
                (PipelineRow.name == newest.c.name) & (PipelineRow.version == newest.c.version),
            )
            .order_by(PipelineRow.name)
        )
        with self._session() as session:
            return [_pipeline(r) for r in session.scalars(query).all()]

    # -- runs ------------------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        pipeline: PipelineRecord,
        inputs: dict[str, Any],
        *,
        actor: str,
        provenance: Provenance | None = None,
        instance: str | None = None,
    ) -> RunRecord:
        """Store a queued run of `pipeline`; `provenance` names the ref and commit it came from
        (the commit defaults to the one the version was registered with); `instance`, the
        server process that runs it, holds its lease from now on (see `fail_abandoned`)."""
        origin = provenance or Provenance()
        with self._session.begin() as session:
            row = RunRow(
                id=run_id,
                pipeline=pipeline.name,
                version=pipeline.version,
                content_hash=pipeline.content_hash,
                commit=origin.commit or pipeline.commit,
                ref=origin.ref,
                rerun_of=origin.rerun_of,
                status="queued",
                inputs=inputs,
                instance=instance,
                heartbeat_at=utcnow() if instance is not None else None,
            )
            session.add(row)
            session.flush()
            _audit(
                session,
                actor,
                "run.create",
                f"run:{run_id}",
                {"pipeline": pipeline.name, "version": pipeline.version}
                | ({"ref": origin.ref} if origin.ref else {}),
            )
            return _run(row, steps=False)

    def apply(self, run_id: str, changes: list[Change]) -> None:
        """Apply run and step changes, in order, in one transaction."""
        with self._session.begin() as session:
            run = session.get(RunRow, run_id, options=[selectinload(RunRow.steps)])
            if run is None:
                raise RunNotFoundError(run_id)
            steps = {s.step: s for s in run.steps}
            for change in changes:
                if isinstance(change, RunChange):
                    _set(run, change.values)
                    continue
                row = steps.get(change.step)
                if row is None:
                    row = steps[change.step] = StepRunRow(step=change.step, status="pending")
                    run.steps.append(row)
                _set(row, change.values)

    def get_run(self, run_id: str) -> RunRecord:
        """A run with its steps; `RunNotFoundError` when there is none."""
        with self._session() as session:
            row = session.get(RunRow, run_id, options=[selectinload(RunRow.steps)])
            if row is None:
                raise RunNotFoundError(run_id)
            return _run(row, steps=True)

    def list_runs(
        self, *, pipeline: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[RunRecord]:
        """Runs, newest first, optionally of one pipeline and/or in one status."""
        query = select(RunRow)
        if pipeline is not None:
            query = query.where(RunRow.pipeline == pipeline)
        if status is not None:
            query = query.where(RunRow.status == status)
        query = query.order_by(RunRow.created_at.desc(), RunRow.id).limit(min(limit, MAX_LIST))
        with self._session() as session:
            return [_run(r, steps=False) for r in session.scalars(query).all()]

    def cancel_unfinished(self, run_ids: list[str], reason: str) -> None:
        """Mark these runs cancelled unless they already finished."""
        with self._session.begin() as session:
            session.execute(
                update(RunRow)
                .where(RunRow.id.in_(run_ids), RunRow.status.not_in(FINISHED))
                .values(status="cancelled", error=reason, finished_at=utcnow())
            )

    def renew_leases(self, instance: str) -> int:
        """Say that `instance` is still running its unfinished runs; how many it holds."""
        with self._session.begin() as session:
            done = session.execute(
                update(RunRow)
                .where(RunRow.instance == instance, RunRow.status.not_in(FINISHED))
                .values(heartbeat_at=utcnow())
            )
            return done.rowcount

    def fail_abandoned(self, *, lease_s: float, instance: str | None = None) -> list[str]:
        """Mark failed every unfinished run whose server stopped renewing its lease `lease_s`
        seconds ago (the process died: nothing else will ever finish the run), with its
        unfinished steps; the ids. `instance` (the caller's own) is left alone.

        One conditional UPDATE: replicas sweeping at once fail each run exactly once."""
        now = utcnow()
        cutoff = now - timedelta(seconds=lease_s)
        expired = RunRow.status.not_in(FINISHED) & (
            (RunRow.heartbeat_at < cutoff)
            # a run stored before leases existed (or by a process without one)
            | (RunRow.heartbeat_at.is_(None) & (RunRow.created_at < cutoff))
        )
        if instance is not None:
            expired &= RunRow.instance.is_distinct_from(instance)
        with self._session.begin() as session:
            ids = list(
                session.scalars(
                    update(RunRow)
                    .where(expired)
                    .values(status="failed", error=ABANDONED_REASON, finished_at=now)
                    .returning(RunRow.id)
                ).all()
            )
            if not ids:
                return []
            session.execute(
                update(StepRunRow)
                .where(StepRunRow.run_id.in_(ids), StepRunRow.status.not_in(STEP_FINISHED))
                .values(status="failed", error=ABANDONED_REASON, finished_at=now)
            )
            for run_id in ids:
                _audit(session, "server", "run.abandoned", f"run:{run_id}", {"lease_s": lease_s})
        return ids

    # -- statistics ------------------------------------------------------------------------------

    def analyze_run(self, run_id: str, resources: dict[str, str]) -> None:
        """Fold a finished run's steps into the statistics (like a database's ANALYZE).

        Every finished or failed step counts under `step:<pipeline>/<step>` and under its
        resource (`resources[step]`, e.g. `tool:kb.search`; a generate step under the model
        that actually answered, `model:<target>`).
        """
        run = self.get_run(run_id)
        with self._session.begin() as session:
            for step in run.steps:
                if step.status not in ("succeeded", "failed"):
                    continue
                resource = f"model:{step.model}" if step.model else resources.get(step.step)
                keys = [f"step:{run.pipeline}/{step.step}", *([resource] if resource else [])]
                for key in keys:
                    _observe(session, key, step)

    def statistics(self) -> list[StatRecord]:
        """Every statistics row, by key."""
        with self._session() as session:
            rows = session.scalars(select(StatisticRow).order_by(StatisticRow.key)).all()
            return [
                StatRecord(
                    key=r.key,
                    count=r.count,
                    failures=r.failures,
                    mean_latency_s=r.mean_latency_s,
                    mean_tokens=r.mean_tokens,
                )
                for r in rows
            ]

    # -- audit -----------------------------------------------------------------------------------

    def audit(self, actor: str, action: str, subject: str, detail: dict[str, Any]) -> None:
        """Append an audit entry."""
        with self._session.begin() as session:
            _audit(session, actor, action, subject, detail)

    def audit_log(self, limit: int = 100) -> list[AuditRecord]:
        """The newest audit entries, newest first."""
        query = select(AuditRow).order_by(AuditRow.at.desc(), AuditRow.id.desc()).limit(limit)
        with self._session() as session:
            return [
                AuditRecord(
                    at=r.at, actor=r.actor, action=r.action, subject=r.subject, detail=r.detail
                )
                for r in session.scalars(query).all()
            ]


def _audit(session: Session, actor: str, action: str, subject: str, detail: dict[str, Any]) -> None:
    session.add(AuditRow(actor=actor[:200], action=action, subject=subject[:200], detail=detail))


def _set(row: RunRow | StepRunRow, values: dict[str, Any]) -> None:
    for name, value in values.items():
        setattr(row, name, value)


def _observe(session: Session, key: str, step: StepRecord) -> None:
    """One observation of `key`, as single UPDATE statements so concurrent runs lose nothing."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(StatisticRow).values(key=key).on_conflict_do_nothing())
    stat = StatisticRow
    if step.status == "failed":
        values = {"count": stat.count + 1, "failures": stat.failures + 1}
    else:
        # Incremental means over successes; SET expressions see the row's old values.
        n = stat.count - stat.failures + 1
        latency = step.duration_s or 0.0
        values = {
            "count": stat.count + 1,
            "mean_latency_s": stat.mean_latency_s + (latency - stat.mean_latency_s) / n,
            "mean_tokens": stat.mean_tokens + (step.tokens - stat.mean_tokens) / n,
        }
    session.execute(update(stat).where(stat.key == key).values(**values, updated_at=utcnow()))


def _pipeline(row: PipelineRow) -> PipelineRecord:
    return PipelineRecord(
        name=row.name,
        version=row.version,
        content_hash=row.content_hash,
        spec_text=row.spec_text,
        spec_format=row.spec_format,
        declared_version=row.declared_version,
        commit=row.commit,
        created_at=row.created_at,
    )


def _run(row: RunRow, *, steps: bool) -> RunRecord:
    return RunRecord(
        id=row.id,
        pipeline=row.pipeline,
        version=row.version,
        content_hash=row.content_hash,
        commit=row.commit,
        ref=row.ref,
        rerun_of=row.rerun_of,
        status=row.status,
        inputs=row.inputs,
        outputs=row.outputs,
        error=row.error,
        failed_step=row.failed_step,
        total_tokens=row.total_tokens,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        sub_pipelines=row.sub_pipelines or [],
        steps=[_step(s) for s in row.steps] if steps else [],
    )


def _step(row: StepRunRow) -> StepRecord:
    return StepRecord(
        step=row.step,
        status=row.status,
        attempts=row.attempts,
        started_at=row.started_at,
        finished_at=row.finished_at,
        duration_s=row.duration_s,
        tokens=row.tokens,
        model=row.model,
        cached=row.cached,
        error=row.error,
        skip_reason=row.skip_reason,
        output=row.output,
        output_truncated=row.output_truncated,
    )
