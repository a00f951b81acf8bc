"""The request's dependencies, declared once as `Annotated` aliases."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from anyio import CapacityLimiter, to_thread
from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from opentelemetry import trace
from pydantic import BeforeValidator
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.auth import Principal, TokenVerifier
from service.database import READ_ONLY, Database, mark_commit_unanswered, sent_nothing
from service.exceptions import AuthError, Forbidden, TokenExpired, TokenMissing
from service.jsonbody import JsonBodyRoute
from service.limits import BIGINT_MAX, USER_ID_MAX
from service.middleware import COMMIT_UNCERTAIN
from service.querystring import KnownQueryRoute
from service.ratelimit import Category, RateLimiter, address_key, category_for
from service.settings import Settings
from service.text import USER_ID_PATTERN
from service.users import UserProvisioner

logger = logging.getLogger(__name__)

bearer_scheme = HTTPBearer(
    auto_error=False,
    bearerFormat="JWT",
    description="A JWT from Better Auth (EdDSA/ES256/RS256 via JWKS) or HS256 signed with "
    "BETTER_AUTH_SECRET. Its `sub` must equal `{user_id}`.",
)

UserIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=USER_ID_MAX,
        # As a token's `sub` must be (service.text): no control characters (PostgreSQL
        # cannot store NUL, and no real id has any), not whitespace alone.
        pattern=USER_ID_PATTERN,
        description="The signed-in user's id",
    ),
]


def plain_digits(value: str) -> bool:
    """A number as the API writes it: plain ASCII digits, `0` or without leading zeros."""
    return value.isascii() and value.isdigit() and (value == "0" or not value.startswith("0"))


def digits_only(what: str) -> BeforeValidator:
    """A number as the API writes it (`what`, for the message): see `plain_digits`. int()
    (and pydantic) also read `1.0`, `+1`, ` 1`, `1_0` and `01`: in a path, another URL of the
    same resource (a DELETE of `/tasks/1.0` deleted task 1); in a query, a value a cache, a
    proxy or a log reads otherwise than the service (`?limit=1_0` served 10)."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and not plain_digits(value):
            raise ValueError(f"must be {what}: digits, without a sign or leading zeros")
        return value

    return BeforeValidator(check)


TaskIdPath = Annotated[
    int, Path(ge=1, le=BIGINT_MAX, description="The task's id"), digits_only("a task id")
]
# Every integer query parameter's, after its `Query(...)`: before it, pydantic would put
# the Query's `ge`/`le` in the OpenAPI schema as such, not as `minimum`/`maximum`.
PlainDigits = digits_only("a whole number")


# Dependencies that do no I/O are `async def`: a sync one costs a thread-pool round trip.


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


# The request's open unit of work, in `session.info` until whoever finishes it takes it.
_UNIT = "request_unit"
# The request's `_Finish`, in `session.info`.
_FINISH = "request_finish"


class _Finish:
    """Whether a sync endpoint's worker thread may commit: not once the request was cancelled
    (uvicorn's shutdown timeout), whose client is told nothing was changed. The thread keeps
    running after the cancellation, so the two decide under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._committing = False

    def may_commit(self) -> bool:
        """In the worker thread, just before committing."""
        with self._lock:
            self._committing = not self._abandoned
            return self._committing

    def abandon(self) -> bool:
        """On cancellation: False if the commit had already begun (its outcome is unknown)."""
        with self._lock:
            self._abandoned = True
            return not self._committing


class RequestAbandoned(Exception):
    """Raised in the worker thread of a cancelled request, to roll its unit of work back."""


def _finish_unit(session: Session, unit: contextlib.AbstractContextManager[Session]) -> None:
    """Commit a request's unit of work (a read unit: give its connection back). A write unit's
    commit that lost its connection may have committed all the same: its error says so
    (`service.database.commit_unanswered`), for the answer not to say "try again"."""
    writes = READ_ONLY not in session.info
    try:
        unit.__exit__(None, None, None)
    except BaseException as exc:
        if writes:
            mark_commit_unanswered(exc)
        raise


def _unit_dependency(
    name: str, open_unit: Callable[[Database], contextlib.AbstractContextManager[Session]]
) -> Callable[..., AsyncIterator[Session]]:
    """A dependency lending a unit of work (`open_unit`'s) to the request.

    Opening a session does no I/O. A sync endpoint of a `UnitOfWorkRoute` finishes the unit
    (commits, or rolls back) in its own worker thread, at the end of its body: one thread hop
    per request, and a transaction holding row locks never waits for a thread-pool token that
    requests queued behind those locks could be holding. Any other endpoint's unit is
    finished here, in a worker thread of its own limiter, for the same reason.

    A request cancelled while its worker thread runs (the thread cannot be stopped) is
    marked abandoned: the thread rolls back instead of committing.
    """

    async def lend(
        request: Request, db: Annotated[Database, Depends(get_database)]
    ) -> AsyncIterator[Session]:
        unit = open_unit(db)
        session = unit.__enter__()
        session.info[_UNIT] = unit
        finish = session.info[_FINISH] = _Finish()
        # A read unit commits nothing: cancelled while finishing, nothing may have been saved.
        writes = READ_ONLY not in session.info
        try:
            yield session
        except BaseException as exc:
            if session.info.pop(_UNIT, None) is not None:
                await to_thread.run_sync(
                    unit.__exit__, type(exc), exc, exc.__traceback__, limiter=CapacityLimiter(1)
                )
            elif isinstance(exc, asyncio.CancelledError) and not finish.abandon() and writes:
                setattr(request.state, COMMIT_UNCERTAIN, True)
            raise
        if session.info.pop(_UNIT, None) is not None:
            try:
                await to_thread.run_sync(_finish_unit, session, unit, limiter=CapacityLimiter(1))
            except asyncio.CancelledError:
                if writes:  # the thread commits regardless
                    setattr(request.state, COMMIT_UNCERTAIN, True)
                raise

    lend.__name__ = lend.__qualname__ = name
    return lend


# One unit of work per request, committed before the response is sent.
get_session = _unit_dependency("get_session", Database.unit_of_work)
# For an endpoint that only reads: its statements in autocommit, without BEGIN and COMMIT
# round trips (`Database.read_unit`).
get_read_session = _unit_dependency("get_read_session", Database.read_unit)


def _finish_in_thread(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """`endpoint`, then the commit (or the rollback) of its SessionDep, in the same thread."""

    @functools.wraps(endpoint)
    def run(*args: Any, **kwargs: Any) -> Any:
        session = next((v for v in kwargs.values() if isinstance(v, Session)), None)
        if session is None or (unit := session.info.pop(_UNIT, None)) is None:
            return endpoint(*args, **kwargs)
        try:
            try:
                result = endpoint(*args, **kwargs)
            except DBAPIError as exc:
                before_use = sent_nothing(exc)
                if not (before_use or (exc.connection_invalidated and READ_ONLY in session.info)):
                    raise
                # The pooled connection was dead and nothing of the transaction was sent
                # (endpoints do nothing but compute before their first statement), or the
                # unit only reads: again, once, on a fresh connection.
                logger.warning(
                    "database connection lost before use; retrying on a new one"
                    if before_use
                    else "database connection lost during a read; retrying on a new one"
                )
                session.rollback()
                result = endpoint(*args, **kwargs)
            finish: _Finish | None = session.info.get(_FINISH)
            if finish is not None and not finish.may_commit():
                raise RequestAbandoned("the request was cancelled; rolled back")
        except BaseException as exc:
            unit.__exit__(type(exc), exc, exc.__traceback__)  # rolls back, never swallows
            raise
        _finish_unit(session, unit)
        return result

    return run


class UnitOfWorkRoute(KnownQueryRoute, JsonBodyRoute):
    """The route class of every router whose endpoints take a SessionDep (every `/api/` one):
    a sync endpoint's body and its commit run in one worker thread (see `get_session`), a
    request body with a repeated key is refused (`service.jsonbody`), and so is a query
    parameter the route does not declare, or a scalar one given twice (`service.querystring`)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint) and not inspect.isgeneratorfunction(endpoint):
            endpoint = _finish_in_thread(endpoint)
        super().__init__(path, endpoint, **kwargs)


# scope="function": the commit runs when the route returns, so a failed commit is an
# error response, never a 2xx.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def count_anonymous(request: Request) -> None:
    """Count a request without a valid token: the client's address is all there is to count
    it by (the proxy's client, per TRUSTED_PROXIES; an IPv6 one by its /64)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    client = request.client.host if request.client else "unknown"
    await limiter.check(request, Category.anonymous, "ip", address_key(client))


async def count_user(request: Request, user_id: str) -> None:
    limiter: RateLimiter = request.app.state.rate_limiter
    await limiter.check(request, category_for(request), "user", user_id)


def identify(request: Request, user_id: str) -> None:
    """The verified token's user on the request's span (`enduser.id`) and log lines
    (`user_id`), as soon as it is known: a request then refused (403 for another user's
    URL, 429 over the user's limit) still says whose token it was."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("enduser.id", user_id)
    request.state.user_id = user_id


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


async def authenticate(request: Request, credentials: BearerDep) -> Principal:
    """The token's user, verified and counted, whatever the URL says.

    A sub-dependency of `get_current_user`: FastAPI calls it before validating the path, so
    a request without a valid token is a 401 (and counted by address) even when its
    `{user_id}` is malformed. Blocking work (a JWKS fetch) goes to a thread; the common case,
    a cached token, does not.
    """
    try:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise TokenMissing("missing bearer token")
        verifier: TokenVerifier = request.app.state.verifier
        principal = verifier.cached(credentials.credentials)
        if principal is None:
            principal = await run_in_threadpool(verifier.verify, credentials.credentials)
    except TokenExpired:
        # Signed by the issuer's key (PyJWT checks the signature before `exp`): not a guess
        # to throttle, but a client that must refresh, which a 429 would tell to wait.
        raise
    except AuthError:
        await count_anonymous(request)
        raise
    identify(request, principal.user_id)  # before a 403 or 429: they name the caller too
    await count_user(request, principal.user_id)
    return principal


async def get_current_user(
    request: Request,
    user_id: UserIdPath,
    principal: Annotated[Principal, Depends(authenticate)],
) -> Principal:
    """The token's user, who must be the `{user_id}` of the URL; a first-seen user's row is
    made (in a thread) before the endpoint runs."""
    if principal.user_id != user_id:
        raise Forbidden("The token does not belong to this user.")
    users: UserProvisioner = request.app.state.users
    if not users.is_known(principal):
        await run_in_threadpool(users.ensure, principal)
    return principal


CurrentUser = Annotated[Principal, Depends(get_current_user)]
