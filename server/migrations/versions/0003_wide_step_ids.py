"""Wider step ids: dynamic steps are named after the step that made them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

A `plan` step records each task it runs as `<step>.<round>.<line>` (and its planner and joiner
calls as `<step>.<round>.planner` / `.joiner`), so a 64-character step id grows past 64
characters; PostgreSQL refuses such a row where SQLite would have kept it silently.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

STEP_ID_LENGTH = 200


def upgrade() -> None:
    """Widen `step_runs.step` and `runs.failed_step`."""
    with op.batch_alter_table("step_runs") as batch:
        batch.alter_column("step", type_=sa.String(STEP_ID_LENGTH), existing_nullable=False)
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("failed_step", type_=sa.String(STEP_ID_LENGTH), existing_nullable=True)


def downgrade() -> None:
    """Narrow them back (fails on PostgreSQL if longer ids were stored)."""
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("failed_step", type_=sa.String(64), existing_nullable=True)
    with op.batch_alter_table("step_runs") as batch:
        batch.alter_column("step", type_=sa.String(64), existing_nullable=False)
