"""priorities, due dates, recurrence and tags on tasks; the cause of an audit event

Existing tasks get the defaults: priority `none`, no due date, no rule, no tags. Indexes serve
every filter and sort of the task list at 100,000 tasks per user. `caused_by_seq` links an
event to the one that caused it (the completion that created a recurring task's next
occurrence); events hashed before it existed keep `hash_version` 1.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PRIORITY = postgresql.ENUM("none", "low", "medium", "high", name="task_priority", create_type=False)


def upgrade() -> None:
    PRIORITY.create(op.get_bind(), checkfirst=False)
    op.add_column(
        "tasks", sa.Column("priority", PRIORITY, server_default=sa.text("'none'"), nullable=False)
    )
    op.add_column("tasks", sa.Column("due_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("tasks", sa.Column("recurrence", sa.String(length=200), nullable=True))
    op.add_column("tasks", sa.Column("previous_task_id", sa.BigInteger(), nullable=True))
    op.add_column("tasks", sa.Column("next_task_id", sa.BigInteger(), nullable=True))
    op.create_check_constraint(
        "ck_tasks_recurrence_needs_due", "tasks", "recurrence IS NULL OR due_at IS NOT NULL"
    )
    op.create_unique_constraint("uq_tasks_id_user", "tasks", ["id", "user_id"])
    op.create_index(
        "uq_tasks_previous",
        "tasks",
        ["previous_task_id"],
        unique=True,
        postgresql_where=sa.text("previous_task_id IS NOT NULL"),
    )
    op.create_index("ix_tasks_user_title", "tasks", ["user_id", "title", "id"])
    op.create_index("ix_tasks_user_due", "tasks", ["user_id", "due_at", "id"])
    op.create_index(
        "ix_tasks_user_due_desc",
        "tasks",
        ["user_id", sa.text("due_at DESC NULLS LAST"), sa.text("id DESC")],
    )
    op.create_index("ix_tasks_user_priority", "tasks", ["user_id", "priority", "id"])
    op.create_index(
        "ix_tasks_user_completed", "tasks", ["user_id", "completed", "created_at", "id"]
    )
    # Trigram indexes for `q`, where the server has pg_trgm (a trusted extension of
    # PostgreSQL's contrib, on Neon too; the embedded server lacks it).
    available = op.get_bind().execute(
        sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
    )
    if available.first() is not None:
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        for name, column in (
            ("ix_tasks_title_trgm", "title"),
            ("ix_tasks_description_trgm", "description"),
        ):
            op.execute(f"CREATE INDEX {name} ON tasks USING gin (lower({column}) gin_trgm_ops)")
    op.create_table(
        "tags",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_tags_user"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("id", "user_id", name="uq_tags_id_user"),
    )
    op.create_index("uq_tags_user_name", "tags", ["user_id", sa.text("lower(name)")], unique=True)
    op.create_table(
        "task_tags",
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("tag_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id", "user_id"],
            ["tasks.id", "tasks.user_id"],
            name="fk_task_tags_task",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tag_id", "user_id"],
            ["tags.id", "tags.user_id"],
            name="fk_task_tags_tag",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", "tag_id"),
    )
    op.create_index("ix_task_tags_tag", "task_tags", ["tag_id", "task_id"])
    op.add_column("audit_events", sa.Column("caused_by_seq", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("audit_events", "caused_by_seq")
    op.drop_index("ix_task_tags_tag", table_name="task_tags")
    op.drop_table("task_tags")
    op.drop_index("uq_tags_user_name", table_name="tags")
    op.drop_table("tags")
    op.execute("DROP INDEX IF EXISTS ix_tasks_description_trgm")
    op.execute("DROP INDEX IF EXISTS ix_tasks_title_trgm")
    for index in (
        "ix_tasks_user_completed",
        "ix_tasks_user_priority",
        "ix_tasks_user_due_desc",
        "ix_tasks_user_due",
        "ix_tasks_user_title",
        "uq_tasks_previous",
    ):
        op.drop_index(index, table_name="tasks")
    op.drop_constraint("uq_tasks_id_user", "tasks", type_="unique")
    op.drop_constraint("ck_tasks_recurrence_needs_due", "tasks", type_="check")
    for column in ("next_task_id", "previous_task_id", "recurrence", "due_at", "priority"):
        op.drop_column("tasks", column)
    PRIORITY.drop(op.get_bind(), checkfirst=False)
