"""Whether the database's schema is one this release's requests can run on.

`serve --no-migrate` (the image's default) may start on a database that was never migrated, or
that a skipped or failed `todo-api migrate` left a revision behind: its requests would be
500s. `/readyz` answers 503 instead, so a load balancer keeps such an instance out, and `serve`
warns at start. A revision this release does not know is newer, from a later release's
migrations, which keep the earlier code working during its rollout: not a problem.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from sqlalchemy import Connection, text
from sqlalchemy.exc import ProgrammingError

MIGRATIONS = Path(__file__).resolve().parent.parent / "alembic"
_UNDEFINED_TABLE = "42P01"
_MIGRATE = "run `todo-api migrate`"


@cache
def _revisions() -> tuple[frozenset[str], frozenset[str]]:
    """This release's newest revisions, and every revision before them."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    heads = frozenset(script.get_heads())
    every = frozenset(revision.revision for revision in script.walk_revisions())
    return heads, every - heads


def schema_problem(connection: Connection) -> str | None:
    """Why this release's requests cannot run on the connection's database, or None. One
    round trip (it is also /readyz's ping)."""
    try:
        found = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
        versions = sorted(found)
    except ProgrammingError as exc:
        if getattr(exc.orig, "pgcode", None) != _UNDEFINED_TABLE:
            raise
        return f"The database is not migrated: {_MIGRATE}."
    heads, older = _revisions()
    if not versions:
        return f"The database is not migrated: {_MIGRATE}."
    behind = [version for version in versions if version in older]
    if behind:
        return (
            f"The database schema is at revision {', '.join(behind)}, older than this "
            f"release's {', '.join(sorted(heads))}: {_MIGRATE}."
        )
    return None
