"""Request rate limits (OWASP API4): per user for signed-in requests, per client IP otherwise.

Counting is done by the `limits` library with a moving window, so at most N requests are
admitted in any window of the limit's length. With `REDIS_URL` the counters live in Redis and
every instance counts against the same keys; without it each process counts alone (in memory).

If Redis fails, requests are admitted (fail open): a warning is logged and a metric counts it,
and Redis is left alone for a short while so that an outage does not add a timeout to every
request. The limits protect capacity; refusing all traffic because the counter store is down
would turn a Redis outage into a full API outage, which is worse than a few minutes unlimited.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import ConfigurationError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from observability import metrics
from service.errors import problem
from service.settings import ConfigError, Settings

log = logging.getLogger("service.ratelimit")

# How long a failing Redis is bypassed (requests admitted) before it is tried again.
REDIS_RETRY_SECONDS = 2.0
# Where the headers computed for a request wait for its response.
_STATE_KEY = "ratelimit_headers"


class Category(StrEnum):
    read = "read"
    write = "write"
    expensive = "expensive"
    anonymous = "anonymous"


metrics.rate_limit_categories_are(Category)

_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def category_for(request: Request) -> Category:
    marked = getattr(request.state, "rate_limit_category", None)
    if isinstance(marked, Category):
        return marked
    return Category.write if request.method in _WRITE_METHODS else Category.read


async def expensive_operation(request: Request) -> None:
    """Route dependency: count this route against the stricter `RATE_LIMIT_EXPENSIVE`."""
    request.state.rate_limit_category = Category.expensive


# The IPv6 prefix one host (a home line, a cloud VM) is given: it may send from any address in it.
IPV6_CLIENT_PREFIX = 64


def address_key(host: str) -> str:
    """What a client address is counted by: an IPv4 address itself (an IPv4-mapped IPv6 one
    too), an IPv6 one by its /64, since one host can pick any of its 2^64 addresses per request
    and would otherwise never reach the anonymous limit. Anything else is kept as it is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    category: Category
    limit: int
    window_seconds: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        """IETF draft-ietf-httpapi-ratelimit-headers: the policy, and what is left of it."""
        name = self.category.value
        headers = {
            "RateLimit-Policy": f'"{name}";q={self.limit};w={self.window_seconds}',
            "RateLimit": f'"{name}";r={self.remaining};t={self.reset_seconds}',
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_seconds))
        return headers


class RateLimited(Exception):
    def __init__(self, decision: Decision) -> None:
        super().__init__("rate limited")
        self.decision = decision


def _redis_storage(settings: Settings, url: str) -> RedisStorage:
    """The Redis counters; an unusable URL is a ConfigError that does not quote it (the URL
    may carry the password, and `limits` quotes it whole)."""
    try:
        return RedisStorage(
            f"async+{url}",
            implementation="redispy",
            key_prefix=settings.rate_limit_key_prefix,
            # A request never waits longer than this for Redis.
            socket_timeout=settings.rate_limit_redis_timeout_seconds,
            socket_connect_timeout=settings.rate_limit_redis_timeout_seconds,
        )
    except (ConfigurationError, ValueError):
        # Not even the reason: with an unencoded "/" in the password, urllib's "Port could not
        # be cast to integer value as ..." quotes part of it.
        raise ConfigError(
            "REDIS_URL is not a usable Redis URL (is its host:port right, and the password "
            "percent-encoded?): write it like redis://[:password@]host:port/db"
        ) from None


class SweptMemoryStorage(MemoryStorage):
    """`limits`' in-process store, its expired windows dropped at most once per
    SWEEP_SECONDS and without a thread hop per key.

    Upstream (limits 5.8) sweeps every key after any hit that finds no sweep running, each
    key through `asyncio.to_thread`: with 30,000 clients in a window that is about 0.8 s of
    CPU per sweep, back to back while requests arrive. Here the sweep runs on the event loop
    between awaits (no key is mid-update then: the store changes a key without awaiting) and
    keeps what a window still counts; a window's expired entries wait at most one interval.
    """

    SWEEP_SECONDS = 1.0

    def __init__(self) -> None:
        self._swept_at = -math.inf
        super().__init__()

    # The base class's private scheduler (name-mangled), which its writes call.
    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now - self._swept_at >= self.SWEEP_SECONDS:
            self._swept_at = now
            self.sweep()

    def sweep(self) -> None:
        now = time.time()
        for key, events in list(self.events.items()):
            # Newest first, as the store keeps them: the ones still live lead.
            live = bisect.bisect_left(events, -now, key=lambda entry: -entry.expiry)
            if live:
                self.events[key] = events[:live]
            else:
                self.events.pop(key, None)
                self.locks.pop(key, None)
        for key, expiry in list(self.expirations.items()):
            if expiry <= now:
                self.storage.pop(key, None)
                self.expirations.pop(key, None)
                self.locks.pop(key, None)


class RateLimiter:
    """The app's limiter: one storage, one limit per category."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.rate_limit_enabled
        self.items: dict[Category, RateLimitItem] = {
            Category.read: parse(settings.rate_limit_read),
            Category.write: parse(settings.rate_limit_write),
            Category.expensive: parse(settings.rate_limit_expensive),
            Category.anonymous: parse(settings.rate_limit_anonymous),
        }
        self.shared = settings.redis_url is not None
        self.storage: Storage
        if settings.redis_url is not None:
            self.storage = _redis_storage(settings, settings.redis_url.get_secret_value())
        else:
            self.storage = SweptMemoryStorage()
        self.strategy = MovingWindowRateLimiter(self.storage)
        self._bypass_until = 0.0

    @property
    def store_name(self) -> str:
        return "redis" if self.shared else "memory"

    async def hit(self, category: Category, *identity: str) -> Decision | None:
        """Count one request; None when the store failed (the request is admitted)."""
        item = self.items[category]
        if self.shared and time.monotonic() < self._bypass_until:
            metrics.rate_limit_store_error()
            return None
        try:
            allowed = await self.strategy.hit(item, category.value, *identity)
            stats = await self.strategy.get_window_stats(item, category.value, *identity)
        except Exception as exc:  # the store's client raises its own family of errors
            self._bypass_until = time.monotonic() + REDIS_RETRY_SECONDS
            metrics.rate_limit_store_error()
            log.warning(
                "rate-limit store unavailable; admitting requests (fail open)",
                extra={"store": self.store_name, "error_type": type(exc).__name__},
            )
            return None
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        decision = Decision(
            allowed=allowed,
            category=category,
            limit=item.amount,
            window_seconds=item.get_expiry(),
            remaining=max(0, stats.remaining),
            reset_seconds=reset,
        )
        if not allowed:
            metrics.rate_limited(category.value)
        return decision

    async def check(self, request: Request, category: Category, *identity: str) -> None:
        """Count the request; raise RateLimited over the limit. Headers go on the response."""
        if not self.enabled:
            return
        decision = await self.hit(category, *identity)
        if decision is None:
            return
        request.scope.setdefault("state", {})[_STATE_KEY] = decision.headers()
        if not decision.allowed:
            raise RateLimited(decision)

    async def ping(self) -> bool:
        """The store answers, and takes a write: a Redis that answers PING but refuses writes
        (a replica after a failover, or full with `noeviction`) admits every request uncounted."""
        try:
            if not await self.storage.check():
                return False
            if self.shared:
                await self.storage.incr("readyz-probe", 1)
            return True
        except Exception:
            return False


class RateLimitHeadersMiddleware:
    """Puts the headers of the request's rate-limit decision on its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = scope.get("state", {}).get(_STATE_KEY)
                if headers:
                    response_headers = MutableHeaders(scope=message)
                    for name, value in headers.items():
                        response_headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _rate_limited(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimited)
    decision = exc.decision
    return problem(
        429,
        f"Too many requests ({decision.category.value} limit: {decision.limit} per "
        f"{decision.window_seconds} s); retry after {max(1, decision.reset_seconds)} s.",
        headers=decision.headers(),
    )


def install_rate_limits(app: FastAPI, limiter: RateLimiter) -> None:
    app.state.rate_limiter = limiter
    app.add_exception_handler(RateLimited, _rate_limited)
