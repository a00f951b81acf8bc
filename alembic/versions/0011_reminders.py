"""reminders: a task's `remind_at`, and which reminder fired last

`remind_at` is a task field like `due_at` (not after it). The reminder workers claim due,
unfired reminders through a partial index holding only those, so the claim stays cheap however
many tasks (and fired or cleared reminders) there are. `reminder_fired_for` is the `remind_at`
that fired: a changed `remind_at` differs from it, which arms the reminder again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFIRED = (
    "remind_at IS NOT NULL AND NOT completed AND reminder_fired_for IS DISTINCT FROM remind_at"
)


def upgrade() -> None:
    op.add_column("tasks", sa.Column("remind_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "tasks", sa.Column("reminder_fired_for", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "tasks", sa.Column("reminder_fired_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "tasks",
        sa.Column("reminder_late", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.create_check_constraint(
        "ck_tasks_remind_before_due",
        "tasks",
        "remind_at IS NULL OR due_at IS NULL OR remind_at <= due_at",
    )
    op.create_index(
        "ix_tasks_reminder_due", "tasks", ["remind_at", "id"], postgresql_where=sa.text(UNFIRED)
    )
    op.create_index(
        "ix_tasks_user_remind",
        "tasks",
        ["user_id", "remind_at", "id"],
        postgresql_where=sa.text("remind_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_user_remind", table_name="tasks")
    op.drop_index("ix_tasks_reminder_due", table_name="tasks")
    op.drop_constraint("ck_tasks_remind_before_due", "tasks", type_="check")
    for column in ("reminder_late", "reminder_fired_at", "reminder_fired_for", "remind_at"):
        op.drop_column("tasks", column)
