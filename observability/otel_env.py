"""The standard `OTEL_*` variables this service reads, checked before anything is built from them.

Left to itself, the SDK replaces a value it cannot use with its default and at most logs a
warning: an unknown sampler becomes always-on, a ratio of `10` or `abc` keeps every trace, an
endpoint that is no URL fails every export, `OTEL_BSP_SCHEDULE_DELAY=abc` is 5000. Here each is
refused with one line naming the variable (`ConfigError`), which `todo-api serve` checks before
its workers start, as it does every other setting. README "Viewing traces in Jaeger" lists them.

An empty value is unset (compose and `.env` files write a variable left blank that way).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypedDict

from opentelemetry.sdk.trace import sampling
from opentelemetry.util.re import parse_env_headers

from service.settings import ConfigError, is_web_url

_RATIO_SAMPLERS: dict[str, Callable[[float], sampling.Sampler]] = {
    "traceidratio": sampling.TraceIdRatioBased,
    "parentbased_traceidratio": sampling.ParentBasedTraceIdRatio,
}
_FIXED_SAMPLERS: dict[str, sampling.Sampler] = {
    "always_on": sampling.ALWAYS_ON,
    "always_off": sampling.ALWAYS_OFF,
    "parentbased_always_on": sampling.DEFAULT_ON,
    "parentbased_always_off": sampling.DEFAULT_OFF,
}
SAMPLERS = (*_FIXED_SAMPLERS, *_RATIO_SAMPLERS)
DEFAULT_SAMPLER = "parentbased_always_on"

ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)
HEADER_VARIABLES = (
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
)
# Seconds: the unit the Python exporters read (the specification says milliseconds, so a
# value past the maximum is most likely milliseconds written for another SDK).
EXPORTER_TIMEOUT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
)
EXPORTER_TIMEOUT_MAX_SECONDS = 300
# The SDK's defaults for the batch span processor and the periodic metric reader: given to
# them explicitly, with the checked values, so that they never read the variables again (a
# blank one, unset here, would be an error there).
_BSP_DEFAULT_SCHEDULE_DELAY = 5000
_BSP_DEFAULT_QUEUE_SIZE = 2048
_BSP_DEFAULT_BATCH_SIZE = 512
_BSP_DEFAULT_EXPORT_TIMEOUT = 30000
_METRIC_DEFAULT_EXPORT_INTERVAL = 60000.0
_METRIC_DEFAULT_EXPORT_TIMEOUT = 30000.0


def value(name: str) -> str | None:
    """The variable's value without surrounding blanks; None if unset or empty (as the SDK
    takes an empty one; blanks alone are a value, most likely refused)."""
    raw = os.environ.get(name, "")
    return raw.strip() if raw else None


def check_otlp_protocol(signal: str) -> None:
    """OTLP over HTTP/protobuf, the one protocol exported here; the signal's own variable
    (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `..._METRICS_...`) wins over the general one, as in
    the SDK, and the refusal names the variable that was set."""
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = value(name)
        if protocol is None:
            continue
        if protocol != "http/protobuf":
            raise ConfigError(
                f"{name}={protocol} is not supported: this service exports OTLP over "
                "HTTP/protobuf (Jaeger and collectors listen for it on port 4318)"
            )
        return


def sdk_disabled() -> bool:
    """`OTEL_SDK_DISABLED=true`: no tracing, no metrics. Anything but true or false is refused
    (the SDK would take it for false)."""
    raw = value("OTEL_SDK_DISABLED")
    if raw is None:
        return False
    if raw.lower() not in ("true", "false"):
        raise ConfigError(f"OTEL_SDK_DISABLED must be true or false, not {raw!r}")
    return raw.lower() == "true"


def sampler_from_env() -> sampling.Sampler:
    """The sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` name; by default
    parent-based always-on. A ratio sampler without an argument keeps every trace (1.0)."""
    raw = value("OTEL_TRACES_SAMPLER") or DEFAULT_SAMPLER
    name = raw.lower()
    if name in _FIXED_SAMPLERS:
        return _FIXED_SAMPLERS[name]
    if name not in _RATIO_SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER must be one of {', '.join(SAMPLERS)}, not {raw!r}")
    arg = value("OTEL_TRACES_SAMPLER_ARG")
    try:
        # The sampler refuses a ratio outside [0, 1] (and NaN) itself.
        return _RATIO_SAMPLERS[name](1.0 if arg is None else float(arg))
    except ValueError:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER_ARG must be the share of traces to keep, a number from 0 "
            f"to 1 (0.1 keeps one in ten), not {arg!r}"
        ) from None


def _number(name: str, *, integer: bool, positive: bool, unit: str) -> float | None:
    """The variable as the SDK reads it (`int()` or `float()`), refused if it is not a
    finite number, or is negative, or (`positive`) is 0."""
    raw = value(name)
    if raw is None:
        return None
    try:
        number = int(raw) if integer else float(raw)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        kind = "an integer" if integer else "a number"
        at_least = "more than 0" if positive else "0 or more"
        raise ConfigError(f"{name} must be {kind} of {unit}, {at_least}, not {raw!r}")
    return number


def _integer(name: str, default: int, *, positive: bool, unit: str) -> int:
    number = _number(name, integer=True, positive=positive, unit=unit)
    return default if number is None else int(number)


def _float(name: str, default: float, *, positive: bool, unit: str) -> float:
    number = _number(name, integer=False, positive=positive, unit=unit)
    return default if number is None else number


def _check_resource_attributes() -> None:
    """key=value pairs separated by commas (the SDK skips, with a warning, any other item).
    An empty entry is skipped, as the SDK does: `a=1,${EXTRA}` with EXTRA empty is common."""
    raw = value("OTEL_RESOURCE_ATTRIBUTES")
    if raw is None:
        return
    for item in raw.split(","):
        if not item.strip():
            continue
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            what = repr(item.strip())
            raise ConfigError(
                f"OTEL_RESOURCE_ATTRIBUTES must be key=value pairs separated by commas "
                f"(e.g. deployment.environment.name=staging), not {what}"
            )


def _check_endpoints() -> None:
    for name in ENDPOINT_VARIABLES:
        raw = value(name)
        if raw is None:
            continue
        # The URL is not repeated: it may carry credentials.
        if raw != os.environ[name]:
            # The exporters read it as it is, blanks included, and fail every export.
            raise ConfigError(f"{name} has blanks around its URL: remove them")
        if not is_web_url(raw):
            raise ConfigError(
                f"{name} must be an http:// or https:// URL with a host and, if any, a port "
                "number (e.g. http://localhost:4318)"
            )


def _check_headers() -> None:
    """name=value pairs, as the SDK's own parser reads them. The values are not repeated:
    they are usually credentials."""
    for name in HEADER_VARIABLES:
        raw = value(name)
        if raw is None:
            continue
        for position, item in enumerate(raw.split(","), start=1):
            with _quiet(parse_env_headers.__module__):
                parsed = parse_env_headers(item, liberal=True)
            if item.strip() and not parsed:
                raise ConfigError(
                    f"{name} must be name=value pairs separated by commas (e.g. "
                    f"authorization=Bearer%20xyz); entry {position} is not (not shown: "
                    "it may be a credential)"
                )


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Without the SDK's warning about a header it cannot parse: it repeats the header."""

    def drop(_: logging.LogRecord) -> bool:
        return False

    logger = logging.getLogger(logger_name)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _check_exporter_timeouts() -> None:
    for name in EXPORTER_TIMEOUT_VARIABLES:
        seconds = _number(name, integer=False, positive=True, unit="seconds")
        if seconds is not None and seconds > EXPORTER_TIMEOUT_MAX_SECONDS:
            raise ConfigError(
                f"{name} is in seconds here, at most {EXPORTER_TIMEOUT_MAX_SECONDS} "
                f"(the Python exporters read seconds; {value(name)} looks like milliseconds)"
            )


class BatchSpanOptions(TypedDict):
    schedule_delay_millis: int
    max_queue_size: int
    max_export_batch_size: int
    export_timeout_millis: int


def batch_span_options() -> BatchSpanOptions:
    """The `BatchSpanProcessor` arguments from `OTEL_BSP_*`."""
    queue = _integer(
        "OTEL_BSP_MAX_QUEUE_SIZE", _BSP_DEFAULT_QUEUE_SIZE, positive=True, unit="spans"
    )
    batch = _integer(
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", _BSP_DEFAULT_BATCH_SIZE, positive=True, unit="spans"
    )
    if batch > queue:
        unset = value("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") is None
        raise ConfigError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}{', its default' if unset else ''}) must "
            f"be at most OTEL_BSP_MAX_QUEUE_SIZE ({queue})"
        )
    return {
        "schedule_delay_millis": _integer(
            "OTEL_BSP_SCHEDULE_DELAY",
            _BSP_DEFAULT_SCHEDULE_DELAY,
            positive=True,
            unit="milliseconds",
        ),
        "max_queue_size": queue,
        "max_export_batch_size": batch,
        # The SDK does not use it yet.
        "export_timeout_millis": _integer(
            "OTEL_BSP_EXPORT_TIMEOUT",
            _BSP_DEFAULT_EXPORT_TIMEOUT,
            positive=False,
            unit="milliseconds",
        ),
    }


class MetricReaderOptions(TypedDict):
    export_interval_millis: float
    export_timeout_millis: float


def metric_reader_options() -> MetricReaderOptions:
    """The `PeriodicExportingMetricReader` arguments from `OTEL_METRIC_EXPORT_*`."""
    return {
        "export_interval_millis": _float(
            "OTEL_METRIC_EXPORT_INTERVAL",
            _METRIC_DEFAULT_EXPORT_INTERVAL,
            positive=True,
            unit="milliseconds",
        ),
        "export_timeout_millis": _float(
            "OTEL_METRIC_EXPORT_TIMEOUT",
            _METRIC_DEFAULT_EXPORT_TIMEOUT,
            positive=False,
            unit="milliseconds",
        ),
    }


def check_otel_environment() -> None:
    """Raise ConfigError for the first unusable value among the variables this service
    documents (the exporters' names and protocol are checked where they are chosen)."""
    sdk_disabled()
    sampler_from_env()
    _check_resource_attributes()
    _check_endpoints()
    _check_headers()
    _check_exporter_timeouts()
    batch_span_options()
    metric_reader_options()
