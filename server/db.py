"""The database schema (SQLAlchemy 2 typed ORM) and the engine: SQLite embedded, PostgreSQL shared.

The schema changes only through migrations (`server/migrations`); `upgrade` brings a database
to the newest revision and runs at every start, so a fresh file and an old one both work.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# SQLite waits this long for another writer (another thread, or another process) to finish.
SQLITE_BUSY_TIMEOUT_S = 30
STEP_ID_LENGTH = 200  # dynamic plan tasks are `<step>.<round>.<line>` (migration 0003)
MAX_REF_CHARS = 256  # runs.ref (migration 0002): longer refs are refused before a run starts

# JSON on SQLite (text), JSONB on PostgreSQL; both round-trip dicts, lists and scalars.
JSONValue = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Store in UTC; a naive value is taken to be UTC already."""
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach the UTC zone that SQLite does not keep; PostgreSQL's session zone becomes UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONValue,
        Any: JSONValue,
    }


class PipelineRow(Base):
    """One registered version of a pipeline spec; versions count up per name."""

    __tablename__ = "pipelines"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_pipelines_name_version"),
        UniqueConstraint("name", "content_hash", name="uq_pipelines_name_content_hash"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int]
    spec_text: Mapped[str] = mapped_column(Text)
    spec_format: Mapped[str] = mapped_column(String(8))
    content_hash: Mapped[str] = mapped_column(String(64))
    declared_version: Mapped[str | None] = mapped_column(String(64))  # the spec's `version:`
    commit: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RunRow(Base):
    """One run of a pipeline version, with its final outcome."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_pipeline_created_at", "pipeline", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    content_hash: Mapped[str] = mapped_column(String(64))
    commit: Mapped[str | None] = mapped_column(String(64))  # the commit the spec was read from
    ref: Mapped[str | None] = mapped_column(String(MAX_REF_CHARS))  # asked for: name@ref
    rerun_of: Mapped[str | None] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16), index=True)
    inputs: Mapped[Any]
    outputs: Mapped[Any | None]
    error: Mapped[str | None] = mapped_column(Text)
    failed_step: Mapped[str | None] = mapped_column(String(STEP_ID_LENGTH))
    total_tokens: Mapped[int] = mapped_column(default=0)
    prompt_tokens: Mapped[int] = mapped_column(default=0)  # of total_tokens
    completion_tokens: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # What each `pipeline` step resolved to: [{ref, name, version, content_hash, commit}].
    sub_pipelines: Mapped[Any | None]
    # The lease of an unfinished run: the server process running it and when it last said so.
    instance: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]

    steps: Mapped[list[StepRunRow]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="StepRunRow.id"
    )


class StepRunRow(Base):
    """One step of one run: its latest status, attempts, timings, tokens and (capped) output."""

    __tablename__ = "step_runs"
    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_step_runs_run_step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(String(STEP_ID_LENGTH))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(default=0)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None]
    tokens: Mapped[int] = mapped_column(default=0)
    model: Mapped[str | None] = mapped_column(String(128))
    cached: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    skip_reason: Mapped[str | None] = mapped_column(String(200))
    output: Mapped[Any | None]
    output_truncated: Mapped[bool] = mapped_column(default=False)

    run: Mapped[RunRow] = relationship(back_populates="steps")


class StatisticRow(Base):
    """Running figures per model, tool or pipeline step, updated from finished runs (ANALYZE)."""

    __tablename__ = "statistics"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # "model:demo-base", ...
    count: Mapped[int] = mapped_column(default=0)  # observations: successes + failures
    failures: Mapped[int] = mapped_column(default=0)
    mean_latency_s: Mapped[float] = mapped_column(default=0.0)  # over successes
    mean_tokens: Mapped[float] = mapped_column(default=0.0)  # over successes
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditRow(Base):
    """Who did what when: pipeline registrations and runs."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine; SQLite gets a busy timeout, foreign keys and write-first locking."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy, not the sqlite3 module, decides when a transaction begins (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # A deferred transaction that reads, then writes, fails at once with "database is locked"
    # when another one did the same; taking the write lock up front makes it wait instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(url: str) -> AlembicConfig:
    """Alembic's configuration for `url`, without an ini file (the server runs it in-process)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database of `engine` to `revision` (the newest by default)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    logger.info("database %s at revision %s", engine.url.render_as_string(), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database of `engine` down to `revision` ("base" drops everything)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
