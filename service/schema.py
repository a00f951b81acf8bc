"""Whether the database's schema is one this release's requests can run on.

`serve --no-migrate` (the image's default) may start on a database that was never migrated, or
that a skipped or failed `todo-api migrate` left a revision behind: its requests would be
500s. `/readyz` answers 503 instead, so a load balancer keeps such an instance out, and `serve`
warns at start. A revision this release does not know is newer, from a later release's
migrations, which keep the earlier code working during its rollout: not a problem. So is a
role granted none of the tables (its requests would be 500s too).
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import ProgrammingError

from service.text import first_line

MIGRATIONS = Path(__file__).resolve().parent.parent / "alembic"
_UNDEFINED_TABLE = "42P01"
_INSUFFICIENT_PRIVILEGE = "42501"
# Every request reads it: a role that may not is one no grant was given.
_REQUIRED_TABLE = "tasks"
_MIGRATE = "run `todo-api migrate`"
NOT_MIGRATED = f"The database is not migrated: {_MIGRATE}."

log = logging.getLogger(__name__)


@cache
def revisions() -> tuple[frozenset[str], frozenset[str]]:
    """This release's newest revisions, and every revision before them: each migration's
    `revision` and `down_revision`, read from its file without importing it or Alembic (a
    worker would carry 12 MB more for its probe). tests/test_cli.py checks that Alembic finds
    the same."""
    down: dict[str, tuple[str, ...]] = {}
    for path in sorted((MIGRATIONS / "versions").glob("*.py")):
        values = dict(_constants(ast.parse(path.read_text(encoding="utf-8"))))
        revision, parents = values["revision"], values.get("down_revision")
        assert isinstance(revision, str), path
        down[revision] = (parents,) if isinstance(parents, str) else tuple(parents or ())
    heads = frozenset(down) - {parent for parents in down.values() for parent in parents}
    return heads, frozenset(down) - heads


def _constants(module: ast.Module) -> Iterator[tuple[str, Any]]:
    """A migration's module-level `revision = ...` and `down_revision = ...` values."""
    for node in module.body:
        target: ast.expr
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            yield target.id, ast.literal_eval(value)


@cache
def _unchecked(reason: str) -> None:
    """Said once a process (and reason), not at every probe."""
    log.warning(
        "the schema revision cannot be read (%s): /readyz does not check it; grant SELECT on "
        "alembic_version to the service's role to have it checked",
        reason,
    )


def _may_read_tasks(connection: Connection) -> bool:
    """Asked only of a role refused alembic_version: one granted nothing at all was ready, and
    answered 500 to every request."""
    connection.rollback()
    query = text("SELECT has_table_privilege(:table, 'SELECT')")
    return bool(connection.execute(query, {"table": _REQUIRED_TABLE}).scalar_one())


def schema_problem(connection: Connection) -> str | None:
    """Why this release's requests cannot run on the connection's database, or None. One
    round trip (it is also /readyz's ping)."""
    try:
        found = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
        versions = sorted(found)
    except ProgrammingError as exc:
        code = getattr(exc.orig, "pgcode", None)
        if code == _UNDEFINED_TABLE:
            return NOT_MIGRATED
        if code == _INSUFFICIENT_PRIVILEGE and not _may_read_tasks(connection):
            return (
                f"The database role may not read the {_REQUIRED_TABLE} table: grant it the "
                "service's tables (every request would fail)."
            )
        # A role not granted the table (least privilege), a table of another shape: the
        # requests may well work, so the check is skipped, not the instance.
        _unchecked(first_line(exc.orig) if exc.orig is not None else str(exc))
        return None
    heads, older = revisions()
    if not versions:
        return NOT_MIGRATED
    behind = [version for version in versions if version in older]
    if behind:
        return (
            f"The database schema is at revision {', '.join(behind)}, older than this "
            f"release's {', '.join(sorted(heads))}: {_MIGRATE}."
        )
    return None
