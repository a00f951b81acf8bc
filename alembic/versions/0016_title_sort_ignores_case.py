"""sort=title orders titles case aside

`sort=title` ordered by the column alone: under the `C` and `C.UTF-8` collations (Neon's
default, and this project's CI) that is byte order, every capital before every small letter
("Zucchini" before "apple"). The list now orders by `lower(title)`, then the title, then the
id, and pages by that key (`?after=`); the index follows. Building it reads the table once,
with writes to `tasks` waiting meanwhile (Alembic runs a migration in one transaction).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_tasks_user_title"  # as `service.tasks.models` names it


def upgrade() -> None:
    op.drop_index(INDEX, table_name="tasks")
    op.create_index(INDEX, "tasks", ["user_id", sa.text("lower(title)"), "title", "id"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="tasks")
    op.create_index(INDEX, "tasks", ["user_id", "title", "id"])
