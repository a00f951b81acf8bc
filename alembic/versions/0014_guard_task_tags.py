"""the completeness guard covers a task's tags: its links and the names of its tags

A task's tags are part of its audited state (`before`, `after`, `changes.tags`), but the
guard of `0002` watched `tasks` alone: a raw `INSERT`/`UPDATE`/`DELETE` on `task_tags`, an
`UPDATE tags SET name`, or a `DELETE FROM tags` (its links go with it) changed what a task
shows, and `audit verify` still passed. Now, checked at commit as for `tasks`: a link made,
moved or removed needs an event for its task in the same transaction, and a renamed or
deleted tag needs one for every task that carries it (a deleted tag's links normally go with
it, and are checked as links; under `session_replication_role = replica` the cascade does not
run, and the tag's own check finds them). TRUNCATE of either table is refused (`0004` did so for
`tasks`). The lookups are those of the tasks guard (`0013`), planned per call (`0005`).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_UPGRADE = [
    """
    CREATE FUNCTION task_tags_require_audit_event() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode = force_custom_plan
    AS $$
    DECLARE
        link task_tags%ROWTYPE;
    BEGIN
        FOREACH link IN ARRAY CASE TG_OP
            WHEN 'INSERT' THEN ARRAY[NEW]
            WHEN 'DELETE' THEN ARRAY[OLD]
            ELSE ARRAY[OLD, NEW]
        END LOOP
            IF NOT EXISTS (
                SELECT 1 FROM audit_events e
                WHERE e.user_id = (SELECT link.user_id)
                  AND e.entity_type = 'task'
                  AND e.entity_id = link.task_id::text
                  AND e.xact_id = txid_current()
            ) THEN
                RAISE EXCEPTION 'the tags of task % were changed (%) without an audit event '
                    'in the same transaction', link.task_id, TG_OP
                    USING ERRCODE = 'integrity_constraint_violation';
            END IF;
        END LOOP;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE CONSTRAINT TRIGGER task_tags_audit_guard
    AFTER INSERT OR UPDATE OR DELETE ON task_tags
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION task_tags_require_audit_event()
    """,
    "ALTER TABLE task_tags ENABLE ALWAYS TRIGGER task_tags_audit_guard",
    """
    CREATE FUNCTION tags_require_audit_events() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode = force_custom_plan
    AS $$
    DECLARE
        tag tags%ROWTYPE := OLD;
        unrecorded bigint;
    BEGIN
        IF TG_OP = 'UPDATE' AND OLD.name IS NOT DISTINCT FROM NEW.name THEN
            RETURN NULL;
        END IF;
        SELECT link.task_id INTO unrecorded
        FROM task_tags link
        WHERE link.tag_id = tag.id
          AND NOT EXISTS (
            SELECT 1 FROM audit_events e
            WHERE e.user_id = (SELECT tag.user_id)
              AND e.entity_type = 'task'
              AND e.entity_id = link.task_id::text
              AND e.xact_id = txid_current()
          )
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'tag % was changed (%) without an audit event for task % '
                'in the same transaction', tag.id, TG_OP, unrecorded
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE CONSTRAINT TRIGGER tags_audit_guard
    AFTER UPDATE OF name OR DELETE ON tags
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION tags_require_audit_events()
    """,
    "ALTER TABLE tags ENABLE ALWAYS TRIGGER tags_audit_guard",
    """
    CREATE TRIGGER task_tags_no_truncate
    BEFORE TRUNCATE ON task_tags
    FOR EACH STATEMENT EXECUTE FUNCTION reject_unaudited_change()
    """,
    "ALTER TABLE task_tags ENABLE ALWAYS TRIGGER task_tags_no_truncate",
    """
    CREATE TRIGGER tags_no_truncate
    BEFORE TRUNCATE ON tags
    FOR EACH STATEMENT EXECUTE FUNCTION reject_unaudited_change()
    """,
    "ALTER TABLE tags ENABLE ALWAYS TRIGGER tags_no_truncate",
]

PG_DOWNGRADE = [
    "DROP TRIGGER tags_no_truncate ON tags",
    "DROP TRIGGER task_tags_no_truncate ON task_tags",
    "DROP TRIGGER tags_audit_guard ON tags",
    "DROP FUNCTION tags_require_audit_events()",
    "DROP TRIGGER task_tags_audit_guard ON task_tags",
    "DROP FUNCTION task_tags_require_audit_event()",
]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    _run(PG_UPGRADE)


def downgrade() -> None:
    _run(PG_DOWNGRADE)
