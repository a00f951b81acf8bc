"""audit events' seq starts at 1

A user's chain runs 1, 2, 3, ... and the incremental verify (`audit_verified_heads`) reads
only the events after the last seq it verified, so a row inserted with seq 0 or below was
served by `GET /audit-events` yet never read by it (a full verify did catch it). A CHECK
constraint makes such a row impossible. Adding it reads every existing row once, under an
exclusive lock on `audit_events` (writes wait for that pass; Alembic runs a migration in one
transaction, so validating separately would not shorten it), and fails the upgrade if such
a row exists.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQ_CHECK = "ck_audit_events_seq_from_1"  # as `audit.models` names it


def upgrade() -> None:
    op.create_check_constraint(SEQ_CHECK, "audit_events", "seq >= 1")


def downgrade() -> None:
    op.drop_constraint(SEQ_CHECK, "audit_events", type_="check")
