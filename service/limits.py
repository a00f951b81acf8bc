"""Limits that more than one part of the service enforces, each named once.

A user id bounds the `users` table, the `{user_id}` path parameter, the audit trail's
`user_id`/`actor_id` and the CLI's `--user`; a request id bounds the `X-Request-ID` header
that is kept and the audit trail's `request_id`. Ids and seqs are PostgreSQL `bigint`s, so a
larger one in a path or a query is a 400, not a database error. The lists (tasks, reminders,
the audit feed and a task's history, `todo-api tasks list`) share their page bounds.
"""

from __future__ import annotations

USER_ID_MAX = 128
REQUEST_ID_MAX = 128
BIGINT_MAX = 2**63 - 1
PAGE_SIZE_MAX = 500
PAGE_SIZE_DEFAULT = 100
OFFSET_MAX = 1_000_000
