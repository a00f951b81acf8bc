"""Alembic environment: the URL comes from the app's settings, the metadata from its models."""

from __future__ import annotations

from logging.config import fileConfig

from sqlmodel import SQLModel

import audit.models  # noqa: F401  (the audit tables, the last verified points among them)
import service.events.tickets
import service.tags.models
import service.tasks.idempotency
import service.tasks.models
import service.users  # noqa: F401  (registers the users table)
from alembic import context
from service.database import build_engine
from service.settings import get_settings
from service.tasks.models import include_object

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, include_object=include_object
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.attributes.get("database_url") or get_settings().database_url
    # Without the requests' statement timeout: an index build on a large table may run longer.
    settings = get_settings().model_copy(update={"db_statement_timeout_ms": 0})
    engine = build_engine(settings, url)
    try:
        with engine.connect() as conn:
            context.configure(
                connection=conn, target_metadata=target_metadata, include_object=include_object
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations()
