"""Initial schema: pipelines, runs, step runs, statistics, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Self-contained on purpose: a migration describes the schema as it was at this revision, so it
imports nothing from `server.db`, whose models keep changing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create every table of the first schema."""
    _create_pipelines()
    _create_runs()
    _create_step_runs()
    _create_statistics()
    _create_audit()


def downgrade() -> None:
    """Drop every table (dependents first)."""
    for table in ("audit", "statistics", "step_runs", "runs", "pipelines"):
        op.drop_table(table)


def _create_pipelines() -> None:
    op.create_table(
        "pipelines",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec_text", sa.Text(), nullable=False),
        sa.Column("spec_format", sa.String(8), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("declared_version", sa.String(64), nullable=True),
        sa.Column("commit", sa.String(64), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_pipelines_name_version"),
        sa.UniqueConstraint("name", "content_hash", name="uq_pipelines_name_content_hash"),
    )


def _create_runs() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("commit", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("inputs", JSON, nullable=False),
        sa.Column("outputs", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("failed_step", sa.String(64), nullable=True),
        sa.Column("total_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False, index=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
    )
    op.create_index("ix_runs_pipeline_created_at", "runs", ["pipeline", "created_at"])


def _create_step_runs() -> None:
    op.create_table(
        "step_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "run_id",
            sa.String(36),
            sa.ForeignKey("runs.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("duration_s", sa.Double(), nullable=True),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("skip_reason", sa.String(200), nullable=True),
        sa.Column("output", JSON, nullable=True),
        sa.Column("output_truncated", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("run_id", "step", name="uq_step_runs_run_step"),
    )


def _create_statistics() -> None:
    op.create_table(
        "statistics",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("mean_latency_s", sa.Double(), nullable=False),
        sa.Column("mean_tokens", sa.Double(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
    )


def _create_audit() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", TIMESTAMP, nullable=False, index=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("detail", JSON, nullable=False),
    )
