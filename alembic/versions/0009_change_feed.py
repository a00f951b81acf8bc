"""change feed: a notification at commit for every audit event, and stream tickets

An AFTER INSERT trigger on audit_events calls pg_notify: PostgreSQL delivers it only when (and
if) the writing transaction commits, in commit order, so no write path has to remember to
notify. The payload is `seq:user_id`, never task content.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_UPGRADE = [
    """
    CREATE FUNCTION audit_events_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('audit_events', NEW.seq::text || ':' || NEW.user_id);
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER audit_events_notify
    AFTER INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_notify()
    """,
    "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_notify",
]

PG_DOWNGRADE = [
    "DROP TRIGGER audit_events_notify ON audit_events",
    "DROP FUNCTION audit_events_notify()",
]


def upgrade() -> None:
    for statement in PG_UPGRADE:
        op.execute(statement)
    op.create_table(
        "feed_tickets",
        sa.Column("ticket_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("token_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ticket_hash"),
    )
    op.create_index("ix_feed_tickets_expires_at", "feed_tickets", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_feed_tickets_expires_at", table_name="feed_tickets")
    op.drop_table("feed_tickets")
    for statement in PG_DOWNGRADE:
        op.execute(statement)
