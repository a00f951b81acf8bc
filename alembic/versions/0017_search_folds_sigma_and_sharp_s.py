"""`q` folds a final sigma and ß, and its trigram indexes follow

`q` compared `lower(column)` with `lower(text)`. lower() maps a capital sigma to the medial
sigma, never to the final one, and leaves 'ß' (whose capitals are 'SS'): the Greek name
Odysseus typed in capitals did not find it, nor "STRASSE" "Straße". Both sides now also map
the final sigma to the medial one and 'ß' to 'ss' (`service.tasks.queries.search_fold`).
The trigram indexes exist only where the server has pg_trgm (0010); they are rebuilt on the
new expression, reading the table once with writes to `tasks` waiting meanwhile.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As `service.tasks.models.TRIGRAM_INDEXES` names them.
INDEXES = {"ix_tasks_title_trgm": "title", "ix_tasks_description_trgm": "description"}
FOLDED = "replace(translate(lower({column}), '\u03c2', '\u03c3'), 'ß', 'ss')"
LOWERED = "lower({column})"


def _rebuild(expression: str) -> None:
    installed = op.get_bind().execute(
        sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")
    )
    if installed.first() is None:
        return
    for name, column in INDEXES.items():
        op.execute(f"DROP INDEX IF EXISTS {name}")
        key = expression.format(column=column)
        op.execute(f"CREATE INDEX {name} ON tasks USING gin (({key}) gin_trgm_ops)")


def upgrade() -> None:
    _rebuild(FOLDED)


def downgrade() -> None:
    _rebuild(LOWERED)
