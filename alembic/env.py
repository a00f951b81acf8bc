"""Alembic environment: the URL comes from the app's settings, the metadata from its models."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from sqlalchemy import Connection, event
from sqlmodel import SQLModel

import audit.models  # noqa: F401  (the audit tables, the last verified points among them)
import service.events.tickets
import service.tags.models
import service.tasks.idempotency
import service.tasks.models
import service.users  # noqa: F401  (registers the users table)
from alembic import context
from service.database import UNTIMED_TRANSACTION, build_engine
from service.settings import get_settings
from service.tasks.models import include_object

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata


def _open_untimed_transaction(dbapi_connection: Any, _record: Any) -> None:
    """First on each new connection, before SQLAlchemy's own queries (the server's version,
    hstore's type): they then run in the transaction psycopg2 opens here, untimed.

    Migrations run with no statement timeout, whoever set it: an index build on a large table
    may run longer than a request should; nor with the idle-in-transaction one (the Python
    between two migrations is not a frozen client)."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute(UNTIMED_TRANSACTION)


def _end_untimed_transaction(dbapi_connection: Any, _record: Any) -> None:
    """Last on each new connection (SQLAlchemy's first one has rolled back already)."""
    dbapi_connection.rollback()


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata, include_object=include_object
    )
    # One transaction for every migration: through a transaction pooler (Neon's -pooler host)
    # it stays on one server connection, so migrating through the pooler works.
    with context.begin_transaction():
        context.execute(UNTIMED_TRANSACTION)
        context.run_migrations()


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = config.attributes.get("database_url") or get_settings().database_url
    # Without the requests' timeouts (not even as a startup option, which a pooler refuses,
    # nor for a statement outside the transaction: `autocommit_block`).
    untimed = {"db_statement_timeout_ms": 0, "db_idle_in_transaction_timeout_ms": 0}
    engine = build_engine(get_settings().model_copy(update=untimed), url)
    event.listen(engine, "connect", _open_untimed_transaction, insert=True)
    event.listen(engine, "connect", _end_untimed_transaction)
    try:
        with engine.connect() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


run_migrations()
