"""audit events' seq starts at 1

A user's chain runs 1, 2, 3, ... and the incremental verify (`audit_verified_heads`) reads
only the events after the last seq it verified, so a row inserted with seq 0 or below was
served by `GET /audit-events` yet never read by it (a full verify did catch it). A CHECK
constraint makes such a row impossible. Added NOT VALID, then validated: the scan of the
existing rows does not block writes meanwhile, and fails the upgrade if such a row exists.

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
    op.execute(f"ALTER TABLE audit_events ADD CONSTRAINT {SEQ_CHECK} CHECK (seq >= 1) NOT VALID")
    op.execute(f"ALTER TABLE audit_events VALIDATE CONSTRAINT {SEQ_CHECK}")


def downgrade() -> None:
    op.drop_constraint(SEQ_CHECK, "audit_events", type_="check")
