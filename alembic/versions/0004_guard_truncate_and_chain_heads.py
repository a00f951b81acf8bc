"""guard TRUNCATE of tasks and the deletion of chain heads

A row-level constraint trigger does not fire on TRUNCATE, so `TRUNCATE tasks` would escape
the completeness guard; and deleting a chain head would restart that user's chain at seq 1.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_UPGRADE = [
    """
    CREATE FUNCTION reject_unaudited_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '% on % is not allowed: changes go through the audited API',
            TG_OP, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER tasks_no_truncate
    BEFORE TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION reject_unaudited_change()
    """,
    "ALTER TABLE tasks ENABLE ALWAYS TRIGGER tasks_no_truncate",
    """
    CREATE TRIGGER audit_chain_heads_no_delete
    BEFORE DELETE ON audit_chain_heads
    FOR EACH ROW EXECUTE FUNCTION reject_unaudited_change()
    """,
    """
    CREATE TRIGGER audit_chain_heads_no_truncate
    BEFORE TRUNCATE ON audit_chain_heads
    FOR EACH STATEMENT EXECUTE FUNCTION reject_unaudited_change()
    """,
    "ALTER TABLE audit_chain_heads ENABLE ALWAYS TRIGGER audit_chain_heads_no_delete",
    "ALTER TABLE audit_chain_heads ENABLE ALWAYS TRIGGER audit_chain_heads_no_truncate",
]

PG_DOWNGRADE = [
    "DROP TRIGGER audit_chain_heads_no_truncate ON audit_chain_heads",
    "DROP TRIGGER audit_chain_heads_no_delete ON audit_chain_heads",
    "DROP TRIGGER tasks_no_truncate ON tasks",
    "DROP FUNCTION reject_unaudited_change()",
]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    _run(PG_UPGRADE)


def downgrade() -> None:
    _run(PG_DOWNGRADE)
