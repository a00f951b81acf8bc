"""OpenTelemetry metrics: one MeterProvider per process, read by Prometheus (`/metrics`) and/or
pushed over OTLP (`OTEL_METRICS_EXPORTER=otlp`).

The instruments are made once, from the global meter; until a provider is configured they are
the API's no-op proxies, so recording costs nothing when metrics are off. Labels never carry a
user id, a task's content or a path with ids in it: routes are templates.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Literal, get_args

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Counter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

from observability.otel_env import (
    check_otel_environment,
    check_otlp_protocol,
    metric_reader_options,
    sdk_disabled,
)
from service.settings import ConfigError, Settings

log = logging.getLogger("observability.metrics")

# The process's Prometheus registry: what /metrics (or METRICS_PORT) renders.
REGISTRY = CollectorRegistry(auto_describe=True)
METER_NAME = "todo-api"

_lock = threading.Lock()
_configured = False
_pools: weakref.WeakSet[Engine] = weakref.WeakSet()

UnavailableCause = Literal[
    "database", "schema", "pool", "db_timeout", "token_keys", "draining", "shutdown"
]
VerifyMode = Literal["full", "incremental"]

_meter = metrics.get_meter(METER_NAME)
_audit_events = _meter.create_counter(
    "todo_api.audit.events",
    unit="{event}",
    description="Audit events committed, by action.",
)
_unavailable = _meter.create_counter(
    "todo_api.http.unavailable",
    unit="{response}",
    description=f"503 answers, by cause ({', '.join(get_args(UnavailableCause))}).",
)
_rate_limited = _meter.create_counter(
    "todo_api.rate_limit.rejections",
    unit="{request}",
    description="Requests refused with 429, by limit category.",
)
_store_errors = _meter.create_counter(
    "todo_api.rate_limit.store_errors",
    unit="{request}",
    description="Requests admitted without counting because the rate-limit store failed.",
)

_verify_failures = _meter.create_counter(
    "todo_api.audit.verify.failures",
    unit="{check}",
    description="Chain verifications over the API that failed, by mode "
    f"({', '.join(get_args(VerifyMode))}).",
)


# Each counter's series, where its labels take a few known values: every one is added 0 at
# start-up, so that an alert on it reads 0 until the first increment, not "no data".
_known_series: list[tuple[Counter, dict[str, str]]] = []


def _known(counter: Counter, label: str | None = None, values: Iterable[str] = ()) -> None:
    series = [{label: str(value)} for value in values] if label else [{}]
    _known_series.extend((counter, attributes) for attributes in series)
    for attributes in series:
        counter.add(0, attributes)  # counted if a provider is set already


def _start_series() -> None:
    """Every known series at 0 in the provider just configured: until then the API's proxy
    instruments drop what they are given. Adding 0 again changes nothing."""
    for counter, attributes in _known_series:
        counter.add(0, attributes)


_known(_unavailable, "cause", get_args(UnavailableCause))
_known(_verify_failures, "audit.verify.mode", get_args(VerifyMode))
_known(_store_errors)


def audit_actions_are(actions: Iterable[str]) -> None:
    """The values of `audit.action` (audit.schemas.AuditAction), each a series from start-up."""
    _known(_audit_events, "audit.action", actions)


def rate_limit_categories_are(categories: Iterable[str]) -> None:
    """The values of `rate_limit.category` (service.ratelimit.Category), each a series from
    start-up."""
    _known(_rate_limited, "rate_limit.category", categories)


def audit_event_committed(action: str) -> None:
    _audit_events.add(1, {"audit.action": action})


def audit_verify_failed(mode: VerifyMode) -> None:
    _verify_failures.add(1, {"audit.verify.mode": mode})


def unavailable(cause: UnavailableCause) -> None:
    _unavailable.add(1, {"cause": cause})


def rate_limited(category: str) -> None:
    _rate_limited.add(1, {"rate_limit.category": category})


def rate_limit_store_error() -> None:
    _store_errors.add(1)


def _pool_name(engine: Engine) -> str:
    url = engine.url
    return f"{url.host}:{url.port or 5432}/{url.database}"


def _pools_observed() -> Iterable[tuple[dict[str, str], QueuePool]]:
    for engine in list(_pools):
        pool = engine.pool
        if isinstance(pool, QueuePool):
            yield {"db.client.connection.pool.name": _pool_name(engine)}, pool


def _connection_count(_: CallbackOptions) -> Iterable[Observation]:
    for attributes, pool in _pools_observed():
        yield Observation(pool.checkedout(), {**attributes, "db.client.connection.state": "used"})
        yield Observation(pool.checkedin(), {**attributes, "db.client.connection.state": "idle"})


def _connection_overflow(_: CallbackOptions) -> Iterable[Observation]:
    for attributes, pool in _pools_observed():
        yield Observation(max(0, pool.overflow()), attributes)


def _connection_max(_: CallbackOptions) -> Iterable[Observation]:
    for attributes, pool in _pools_observed():
        yield Observation(pool.size() + max(0, pool._max_overflow), attributes)


_meter.create_observable_up_down_counter(
    "db.client.connection.count",
    callbacks=[_connection_count],
    unit="{connection}",
    description="Connections of the pool, by state (used, idle).",
)
_meter.create_observable_up_down_counter(
    "db.client.connection.overflow",
    callbacks=[_connection_overflow],
    unit="{connection}",
    description="Connections open beyond the pool size (DB_MAX_OVERFLOW); not a semantic "
    "convention, SQLAlchemy's own notion.",
)
_meter.create_observable_up_down_counter(
    "db.client.connection.max",
    callbacks=[_connection_max],
    unit="{connection}",
    description="The most connections the pool may open (pool size + overflow).",
)


def observe_pool(engine: Engine) -> None:
    """Report this engine's pool in the db.client.connection.* metrics."""
    _pools.add(engine)


def _otlp_reader() -> MetricReader:
    check_otlp_protocol("METRICS")
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    # The exporter reads the endpoint, headers and timeout variables itself; the interval and
    # export timeout are read and checked by otel_env.
    return PeriodicExportingMetricReader(OTLPMetricExporter(), **metric_reader_options())


def metric_exporter_names(settings: Settings) -> list[str]:
    """The exporters `OTEL_METRICS_EXPORTER` names besides Prometheus (METRICS_ENABLED).

    Raises ConfigError for what `metric_readers` would refuse, without making any: `serve`
    checks it before its workers start. `prometheus` without METRICS_ENABLED is refused: it
    was accepted, and nothing served.
    """
    names = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    chosen: list[str] = []
    for name in (part.strip() for part in names.split(",")):
        if name == "prometheus" and not settings.metrics_enabled:
            raise ConfigError(
                "OTEL_METRICS_EXPORTER=prometheus needs METRICS_ENABLED=true: that serves "
                "/metrics (on METRICS_PORT, if set)"
            )
        if name in ("", "none", "prometheus"):
            continue
        if name != "otlp":
            raise ConfigError(f"OTEL_METRICS_EXPORTER must be otlp, prometheus or none: {name!r}")
        check_otlp_protocol("METRICS")
        chosen.append(name)
    return chosen


def check_metrics_enabled(settings: Settings) -> None:
    """METRICS_ENABLED with `OTEL_SDK_DISABLED=true` is refused: /metrics was served, empty,
    since the SDK that fills it was off."""
    if settings.metrics_enabled and sdk_disabled():
        raise ConfigError(
            "METRICS_ENABLED=true needs the OpenTelemetry SDK, which OTEL_SDK_DISABLED=true "
            "turns off (and /metrics with it): unset one of them"
        )


def metric_readers(settings: Settings) -> list[MetricReader]:
    readers: list[MetricReader] = []
    if settings.metrics_enabled:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader(registry=REGISTRY))
    readers.extend(_otlp_reader() for _ in metric_exporter_names(settings))
    return readers


def configure_metrics(settings: Settings, resource: Any) -> MeterProvider | None:
    """The process's MeterProvider, made and registered globally on the first call.

    None if there is nothing to export to (metrics off) or the SDK is disabled. A provider
    someone registered before us (the tests' in-memory one) is used as it is.
    """
    global _configured
    with _lock:
        current = metrics.get_meter_provider()
        if isinstance(current, MeterProvider):
            _start_series()
            return current
        if _configured:
            return None
        _configured = True
        check_metrics_enabled(settings)
        if sdk_disabled():
            return None
        check_otel_environment()
        readers = metric_readers(settings)
        if not readers:
            return None
        # What the OTLP reader holds is pushed by the app's shutdown, within its budget
        # (observability.flush), not by the SDK's unbounded exit handler.
        provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
        metrics.set_meter_provider(provider)
        _start_series()
        return provider


def start_metrics_server(settings: Settings) -> Any:
    """With METRICS_PORT, serve /metrics there (a port the load balancer does not expose).

    Each process binds it; with `serve --workers N` only the first worker gets the port (the
    others log a warning), so use one worker per container with a separate metrics port.
    """
    if not settings.metrics_enabled or settings.metrics_port is None:
        return None
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=REGISTRY
        )
    except OSError as exc:
        log.warning(
            "metrics port unavailable; this process's metrics are not served",
            extra={"port": settings.metrics_port, "error": str(exc)},
        )
        return None
    return server
