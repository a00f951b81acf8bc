"""Length limits that more than one part of the service enforces, each named once.

A user id bounds the `users` table, the `{user_id}` path parameter, the audit trail's
`user_id`/`actor_id` and the CLI's `--user`; a request id bounds the `X-Request-ID` header
that is kept and the audit trail's `request_id`.
"""

from __future__ import annotations

USER_ID_MAX = 128
REQUEST_ID_MAX = 128
