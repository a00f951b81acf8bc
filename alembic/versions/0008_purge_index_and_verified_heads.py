"""an index for purging expired idempotency keys; the last verified point of each audit chain

`idempotency_keys.created_at` is indexed so the background purge finds expired keys without
scanning the table. `audit_verified_heads` keeps, per user, the seq and hash up to which the
verify endpoint last found the chain intact, so the next call checks only what came after.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"], unique=False
    )
    op.create_table(
        "audit_verified_heads",
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id"),
    )


def downgrade() -> None:
    op.drop_table("audit_verified_heads")
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
