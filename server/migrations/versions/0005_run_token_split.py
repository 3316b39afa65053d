"""Runs count prompt and completion tokens apart (OpenAI `usage` of a pipeline chat answer).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22

`total_tokens` stays the sum; runs stored before this revision read 0 for both parts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `runs.prompt_tokens` and `runs.completion_tokens`."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("prompt_tokens", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("completion_tokens", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("completion_tokens")
        batch.drop_column("prompt_tokens")
