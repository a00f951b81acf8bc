"""the pending tasks' index: counts and pages of open tasks without reading completed ones

`status=pending`, `overdue=true` and their combinations with `priority` are the frontend's
everyday views. The (user_id, completed, ...) index serves their pages, but a count of a
user's open tasks then reads every one of the user's index entries and visits the heap for
the other filters. This partial index holds only open tasks, with the columns those filters
test, so the count is an index-only scan of the open tasks alone.

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
        ["user_id", "priority", "due_at"],
        postgresql_where=sa.text("completed IS FALSE"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_user_pending", table_name="tasks")
