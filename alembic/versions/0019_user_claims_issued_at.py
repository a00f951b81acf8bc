"""the users row remembers the `iat` of the token whose email and name it stores

Another tab's token from before a rename in Better Auth stays valid until it expires; its
older claims no longer replace newer ones, whichever process sees it. Existing rows have
none (the next token's claims are stored, as before). Adding a nullable column rewrites
nothing.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("claims_issued_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "claims_issued_at")
