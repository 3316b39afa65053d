"""Run provenance: the ref a run asked for and the run it repeats.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

`runs.commit` and `runs.content_hash` (0001) hold the commit the spec was read from and its
hash; `runs.ref` adds what the caller named (`f1`, `f1@v1.2.0`, `f1@main`) and `runs.rerun_of`
links a re-run to the run it repeats with the exact same spec.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the nullable provenance columns (old runs keep NULL: they named no ref)."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("ref", sa.String(256), nullable=True))
        batch.add_column(sa.Column("rerun_of", sa.String(36), nullable=True))


def downgrade() -> None:
    """Drop the provenance columns."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("rerun_of")
        batch.drop_column("ref")
