"""a failed audit verification is recorded next to the last verified point

`audit_verified_heads.failed_at` is set by every verification over the API that fails, and
cleared only by one that passes from seq 1. While it is set, the incremental verify checks
the whole chain again instead of only the events after the last verified point, so a failure
found by `?full=true` in events verified earlier is not followed by an `ok` from the
incremental check. A failure before any pass stores the point at seq 0 (nothing verified).
Adding a nullable column rewrites nothing.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "audit_verified_heads", sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("audit_verified_heads", "failed_at")
