"""Sub-pipeline provenance and run leases.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22

`runs.sub_pipelines` lists what each `pipeline` step of a run resolved to (name, version,
content hash, commit), so a run of `caller@v1` says which callee it ran. `runs.instance` and
`runs.heartbeat_at` lease an unfinished run to the server process running it: the process
renews the lease while it runs, and any replica that finds a lease expired marks the run
failed (its process died) instead of leaving it `running` forever.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add the nullable columns (old runs named no sub-pipelines and hold no lease)."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("sub_pipelines", JSON, nullable=True))
        batch.add_column(sa.Column("instance", sa.String(64), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", TIMESTAMP, nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("instance")
        batch.drop_column("sub_pipelines")
