"""the pending tasks' index: counts and pages of open tasks without reading completed ones

`status=pending` and `overdue=true` (alone or with `priority`) are the frontend's everyday
views. Indexes on (user_id, completed, ...) and (user_id, due_at, ...) serve their pages, but
their counts (X-Total-Count) read every task of the user, completed or not, or were planned
as a sequential scan at 100,000 tasks. This partial index holds only open tasks, by due date:
the pending count is an index-only scan of the open tasks, the overdue count a range of them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_tasks_user_pending",
        "tasks",
        ["user_id", "due_at", "priority"],
        postgresql_where=sa.text("completed IS FALSE"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_user_pending", table_name="tasks")
