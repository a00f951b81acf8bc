"""audit guards: append-only audit_events, and no task change without its audit event

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ENABLE ALWAYS: the triggers fire under session_replication_role = replica too.
PG_UPGRADE = [
    """
    CREATE FUNCTION audit_events_reject_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_reject_change()
    """,
    """
    CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_reject_change()
    """,
    "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only",
    "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_truncate",
    # The completeness guard: checked at commit, after every statement of the transaction.
    """
    CREATE FUNCTION tasks_require_audit_event() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        changed tasks%ROWTYPE;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            changed := OLD;
        ELSE
            changed := NEW;
        END IF;
        IF NOT EXISTS (
            SELECT 1 FROM audit_events e
            WHERE e.user_id = changed.user_id
              AND e.entity_type = 'task'
              AND e.entity_id = changed.id::text
              AND e.xact_id = txid_current()
        ) THEN
            RAISE EXCEPTION 'task % was changed (%) without an audit event in the same transaction',
                changed.id, TG_OP
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE CONSTRAINT TRIGGER tasks_audit_guard
    AFTER INSERT OR UPDATE OR DELETE ON tasks
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION tasks_require_audit_event()
    """,
    "ALTER TABLE tasks ENABLE ALWAYS TRIGGER tasks_audit_guard",
]

PG_DOWNGRADE = [
    "DROP TRIGGER tasks_audit_guard ON tasks",
    "DROP FUNCTION tasks_require_audit_event()",
    "DROP TRIGGER audit_events_no_truncate ON audit_events",
    "DROP TRIGGER audit_events_append_only ON audit_events",
    "DROP FUNCTION audit_events_reject_change()",
]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    _run(PG_UPGRADE)


def downgrade() -> None:
    _run(PG_DOWNGRADE)
