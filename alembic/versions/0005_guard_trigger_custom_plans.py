"""plan the completeness guard's lookup for each call

PL/pgSQL caches a statement's plan per connection and may switch to a generic plan. One made
while audit_events was small stays a sequential scan on a long-lived pooled connection, so
every COMMIT would cost more as the log grows. A custom plan uses the entity index every time.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER FUNCTION tasks_require_audit_event() SET plan_cache_mode = force_custom_plan")


def downgrade() -> None:
    op.execute("ALTER FUNCTION tasks_require_audit_event() RESET plan_cache_mode")
