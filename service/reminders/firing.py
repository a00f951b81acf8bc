"""Firing due reminders, exactly once across every worker of every instance.

Each worker process runs a `ReminderWorker`: a daemon thread that, every
REMINDER_POLL_SECONDS, claims due reminders in batches of REMINDER_BATCH_SIZE and fires them,
one transaction per batch:

1. `SELECT ... FOR UPDATE SKIP LOCKED` takes the row locks of up to a batch of due, unfired
   reminders (tasks not completed, `reminder_fired_for` not yet their `remind_at`) and of
   their users' chain heads. Rows that another worker or a write holds are skipped, so
   workers share the due reminders instead of queueing, and a user in the middle of a write
   waits for the next poll instead of holding up the batch.
2. For each, a `reminder.fired` audit event is appended to the user's chain and the task is
   marked fired for that `remind_at` (the same transaction).
3. The commit releases the locks. A reminder is fired iff that commit happened: a worker that
   dies first rolls back (PostgreSQL ends the transaction with the connection) and the next
   claim, by any worker, takes it again; after the commit no claim matches it.

A reminder that fires more than REMINDER_GRACE_SECONDS after its time (the service was down,
or `remind_at` was set in the past) is marked late.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy.orm import Session

from audit.recorder import AuditContext, RecordedEvent, record_event
from audit.schemas import AuditAction, FiredReminder
from observability.logging import failure_reason
from service.database import Database, on_commit
from service.reminders import queries
from service.reminders.queries import Claim
from service.settings import Settings
from service.tasks import queries as task_queries
from service.tasks.rules import ENTITY_TYPE

log = logging.getLogger("service.reminders")

# What a reminder.fired event records besides the task: `changes` = {"reminder": [null, {...}]}.
REMINDER_FIELDS = ("reminder",)


def fire(session: Session, ctx: AuditContext, claim: Claim) -> RecordedEvent:
    """Record the claimed reminder's event and mark it fired; the task itself is unchanged
    (`before` and `after` are its state; `after.reminder` says which time fired, and late)."""
    task = task_queries.get_task(session, claim.user_id, claim.task_id)  # locked by the claim
    state = task.state()
    reminder = FiredReminder(remind_at=state["remind_at"], late=claim.late).model_dump(mode="json")
    event = record_event(
        session,
        ctx,
        user_id=task.user_id,
        action=AuditAction.reminder_fired.value,
        entity_type=ENTITY_TYPE,
        entity_id=str(task.id),
        before=state,
        after={**state, "reminder": reminder},
        diff_fields=REMINDER_FIELDS,
    )
    queries.mark_fired(session, claim)
    on_commit(
        session,
        lambda: log.info(
            event.action,
            extra={
                "event": event.action,
                "task_id": task.id,
                "user_id": task.user_id,
                "audit_event_id": event.id,
                "late": claim.late,
            },
        ),
    )
    return event


def fire_due(db: Database, settings: Settings) -> int:
    """Claim and fire one batch of due reminders in one transaction; how many were claimed."""
    ctx = AuditContext(actor_id=settings.reminder_actor_id)
    grace = timedelta(seconds=settings.reminder_grace_seconds)
    with db.unit_of_work() as session:
        claims = queries.claim_due(session, settings.reminder_batch_size, grace)
        # The claim holds every chain head the batch appends to: nothing here waits.
        for claim in sorted(claims, key=lambda c: (c.user_id, c.task_id)):
            fire(session, ctx, claim)
    return len(claims)


class ReminderWorker:
    """The polling loop of one process, in a daemon thread.

    Not traced: a trace per poll of every worker would bury the requests' traces; each firing
    writes a log line. A failed batch (database away, a deadlock) is logged and retried at the
    next poll; its transaction rolled back, so nothing fired half.
    """

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reminders", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling. A batch in flight gets `timeout` to commit; past that the process
        may exit under it, which rolls it back (another worker claims its reminders)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run_once(self) -> int:
        """Fire every reminder due now, batch after batch; how many fired."""
        fired = 0
        with suppress_instrumentation():
            while not self._stop.is_set():
                claimed = fire_due(self._db, self._settings)
                fired += claimed
                if claimed < self._settings.reminder_batch_size:
                    break
        return fired

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fired = self.run_once()
            except Exception as exc:
                log.warning(
                    "firing reminders failed",
                    extra={"error_type": type(exc).__name__, "reason": failure_reason(exc)},
                )
            else:
                if fired:
                    log.info("reminders fired", extra={"fired": fired})
            self._stop.wait(self._settings.reminder_poll_seconds)
