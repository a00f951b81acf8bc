"""Background work each process runs while it serves: purging expired idempotency keys, and
firing due reminders (unless REMINDERS_ENABLED=false).

Every instance runs both; they skip rows another one holds, so they share the work.
A failure (the database is away) is logged and tried again at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from anyio import to_thread
from opentelemetry.instrumentation.utils import suppress_instrumentation

from observability.logging import failure_reason
from service.database import Database
from service.reminders.firing import ReminderWorker
from service.settings import Settings
from service.tasks import idempotency

log = logging.getLogger("service.maintenance")


def _purge_untraced(db: Database, settings: Settings) -> int:
    """Housekeeping outside any request: its statements would be spans without a trace."""
    with suppress_instrumentation():
        return idempotency.purge_expired(db.engine, settings.idempotency_retention)


async def _purge_forever(db: Database, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.idempotency_purge_interval_seconds)
        try:
            deleted = await to_thread.run_sync(_purge_untraced, db, settings)
        except Exception as exc:
            log.warning(
                "idempotency key purge failed",
                extra={"error_type": type(exc).__name__, "reason": failure_reason(exc)},
            )
            continue
        if deleted:
            log.info("purged expired idempotency keys", extra={"deleted": deleted})


@asynccontextmanager
async def background_upkeep(db: Database, settings: Settings) -> AsyncIterator[None]:
    task = asyncio.create_task(_purge_forever(db, settings), name="idempotency-purge")
    reminders = ReminderWorker(db, settings) if settings.reminders_enabled else None
    if reminders is not None:
        reminders.start()
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        if reminders is not None:
            await to_thread.run_sync(reminders.stop)
