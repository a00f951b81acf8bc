"""the completeness guard looks a task's event up by the task, whatever the statistics know

The guard's lookup (`0002`, planned per call since `0005`) names the user, the task and the
transaction. Planned with the user's id as a constant, a user that the statistics have never
seen (a new user where few users hold all the rows, until autoanalyze runs) is estimated at
one event, and the planner takes the smaller `(user_id, seq)` index: each check then walks
every event of that user, and a transaction that changes N of its tasks (a tag renamed or
deleted) costs N x (its events). Behind a sub-select the id is a value known only when the
statement runs, so the user's share is the column's average, and the `(user_id,
entity_type, entity_id)` index wins as it should. Still planned per call (`0005`): a plan
made while the log was small would otherwise stay.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# CREATE OR REPLACE resets the function's settings: `plan_cache_mode` is given again.
_GUARD = """
    CREATE OR REPLACE FUNCTION tasks_require_audit_event() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode = force_custom_plan
    AS $$
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
            WHERE e.user_id = {user_id}
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
"""


def upgrade() -> None:
    op.execute(_GUARD.format(user_id="(SELECT changed.user_id)"))


def downgrade() -> None:
    op.execute(_GUARD.format(user_id="changed.user_id"))
