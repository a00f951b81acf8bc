"""Reminders: a task's `remind_at` fires one `reminder.fired` audit event, once, across every
instance of the service (claimed with `FOR UPDATE SKIP LOCKED`; see `firing`)."""
