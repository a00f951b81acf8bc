"""The domain exceptions: what went wrong, in terms a client can be told.

No web framework here: the rules, the queries, the audit trail and the CLI raise these, and
`service.errors` renders each as problem+json of the kind (`service.problem_types`) it names.
"""

from __future__ import annotations

from typing import ClassVar

from service.problem_types import ProblemType


class DomainError(Exception):
    kind: ClassVar[ProblemType] = ProblemType.validation
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field  # named as in validation errors: "query.q", "body.title"


class InvalidInput(DomainError):
    kind = ProblemType.validation


class Forbidden(DomainError):
    kind = ProblemType.user_mismatch


class NotFound(DomainError):
    kind = ProblemType.not_found


class IdempotencyConflict(DomainError):
    kind = ProblemType.idempotency_conflict


class TagConflict(DomainError):
    kind = ProblemType.tag_conflict


class PreconditionFailed(DomainError):
    kind = ProblemType.precondition_failed


class NotAcceptable(DomainError):
    kind = ProblemType.not_acceptable


# The change feed's: a stream is long-lived, so its client waits longer before it tries again.
_FEED_RETRY_AFTER = {"Retry-After": "10"}


class TooManyStreams(DomainError):
    kind = ProblemType.rate_limited
    headers = _FEED_RETRY_AFTER


class FeedUnavailable(DomainError):
    kind = ProblemType.unavailable
    headers = _FEED_RETRY_AFTER


class AuthError(Exception):
    """The token is not acceptable (401). The message is safe to show to the client."""


class TokenMissing(AuthError):
    """No bearer token at all: the caller is not signed in."""


class TokenExpired(AuthError):
    """A token that was valid and has expired: get a fresh one and retry."""


class AuthUnavailable(Exception):
    """The signing keys cannot be fetched, so the token cannot be judged (503, not 401).

    `retry_after`: seconds until the keys may be fetched again, the earliest a retry can
    succeed."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
