"""OpenTelemetry tracing: one SDK TracerProvider per process, configured by the standard
`OTEL_*` variables, and the FastAPI and SQLAlchemy instrumentation that feed it.

The provider is made once per process (each `serve --workers N` worker makes its own) and can
be replaced by an explicit one, which is how the tests collect spans in memory.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import uuid
import weakref
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.propagators import (
    ResponsePropagator,
    get_global_response_propagator,
    set_global_response_propagator,
)
from opentelemetry.instrumentation.sqlalchemy.version import __version__ as _SQLA_INSTR_VERSION
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.http import (
    OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS,
    get_custom_headers,
)
from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import StatementError

from observability.logging import format_exception, holds_database_error
from observability.otel_env import (
    batch_span_options,
    check_otel_environment,
    check_otlp_protocol,
    sampler_from_env,
    sdk_disabled,
)
from service.routing import every_route
from service.settings import ConfigError, Settings
from service.text import first_line

SERVICE_NAME = "todo-api"
TRACE_ID_HEADER = "X-Trace-Id"
# Probes are not traced: a span per probe per second would bury the real traffic.
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_EXCLUDED_URLS = r"^[a-z]+://[^/]+/(?:healthz|readyz|metrics)/?$"
_OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_SEMCONV_OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"
# Query parameters kept out of `url.query`: what people typed (task search text, tag names,
# and the last title seen, in the `after` cursor of a list sorted by title), and the change
# feed's stream ticket (a credential, if only for seconds). So is any name no route declares
# (`public_query_names`).
PRIVATE_QUERY_PARAMETERS = frozenset({"q", "tag", "after", "ticket"})
# Request headers whose values never go into a span, even when an operator has the
# instrumentation capture every header (OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST
# set to `.*`): the bearer token, and the Better Auth session cookie a same-site frontend sends
# along. Regexes, as in ..._SANITIZE_FIELDS, whose own entries are kept beside them.
CREDENTIAL_HEADERS = ("^authorization$", "^proxy-authorization$", "^cookie$")

_lock = threading.Lock()
_configured = False
_process_provider: trace.TracerProvider | None = None
_traced_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def service_version() -> str:
    try:
        return metadata.version(SERVICE_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


_instance: tuple[int, str] = (os.getpid(), str(uuid.uuid4()))


def instance_id() -> str:
    """This process's `service.instance.id`: one per process, so its spans and its metrics
    name the same instance, and each worker (even a forked one) its own."""
    global _instance
    pid = os.getpid()
    if _instance[0] != pid:
        _instance = (pid, str(uuid.uuid4()))
    return _instance[1]


# The environment under its current semantic-convention name and its older one, which
# backends (Jaeger's UI among them) still show.
_ENVIRONMENT_KEYS = ("deployment.environment.name", "deployment.environment")


def build_resource(settings: Settings) -> Resource:
    """Our defaults, overridden by `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`.

    Both environment keys carry one value: `deployment.environment.name` from
    OTEL_RESOURCE_ATTRIBUTES if given, else `deployment.environment` from it, else APP_ENV.
    """
    from_env = OTELResourceDetector().detect().attributes
    environment = next(
        (from_env[key] for key in _ENVIRONMENT_KEYS if key in from_env), settings.app_env.value
    )
    defaults: dict[str, Any] = {
        "service.name": SERVICE_NAME,
        "service.version": service_version(),
        # Tells the workers of one server apart in Jaeger.
        "service.instance.id": instance_id(),
    }
    return Resource.create(
        {**defaults, **from_env, **dict.fromkeys(_ENVIRONMENT_KEYS, environment)}
    )


def _otlp_exporter() -> SpanExporter:
    check_otlp_protocol("TRACES")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # The exporter reads the endpoint, headers, timeout and compression variables itself.
    return OTLPSpanExporter()


def span_exporter_names() -> list[str]:
    """The exporters `OTEL_TRACES_EXPORTER` names; unset, OTLP if an OTLP endpoint is set.

    Raises ConfigError for what `span_exporters` would refuse, without making any: `serve`
    checks it before its workers start.
    """
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not names:
        names = "otlp" if any(os.environ.get(var) for var in _OTLP_ENDPOINT_VARS) else "none"
    chosen: list[str] = []
    for name in (part.strip() for part in names.split(",")):
        if name in ("", "none"):
            continue
        if name not in ("otlp", "console"):
            raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp, console or none, not {name!r}")
        if name == "otlp":
            check_otlp_protocol("TRACES")
        chosen.append(name)
    return chosen


def span_exporters() -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in span_exporter_names():
        if name == "otlp":
            exporters.append(_otlp_exporter())
        else:
            # stderr: stdout carries the JSON log lines.
            exporters.append(ConsoleSpanExporter(out=sys.stderr))
    return exporters


def build_tracer_provider(settings: Settings) -> TracerProvider:
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG), default parent-based always-on, the
    # batch processor's arguments from OTEL_BSP_* (both read and checked by otel_env).
    # The app's shutdown flushes the spans within its budget (observability.flush); the
    # SDK's exit handler would flush again, without a bound.
    provider = TracerProvider(
        resource=build_resource(settings), sampler=sampler_from_env(), shutdown_on_exit=False
    )
    for exporter in span_exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter, **batch_span_options()))
    return provider


def configure_tracing(settings: Settings) -> trace.TracerProvider | None:
    """The process's provider, made and registered globally on the first call.

    None when `OTEL_SDK_DISABLED=true`. A provider someone registered before us is used as it
    is. Later calls return the same provider: the global one can be set only once.
    """
    global _configured, _process_provider
    with _lock:
        if not _configured:
            if sdk_disabled():
                _process_provider = None
            else:
                current = trace.get_tracer_provider()
                if isinstance(current, trace.ProxyTracerProvider):
                    check_otel_environment()
                    current = build_tracer_provider(settings)
                    trace.set_tracer_provider(current)
                _process_provider = current
            _configured = True
        return _process_provider


class TraceIdResponsePropagator(ResponsePropagator):
    """Puts the server span's trace id in `X-Trace-Id`, so any response leads to its trace.

    The ASGI instrumentation calls it for every response message, including the 500 that
    Starlette's outermost error handler sends.
    """

    def inject(
        self,
        carrier: Any,
        context: Any = None,
        setter: Any = None,
    ) -> None:
        if setter is None or carrier.get("type") != "http.response.start":
            return
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            setter.set(carrier, TRACE_ID_HEADER, trace.format_trace_id(span_context.trace_id))


def _prepare_instrumentation() -> None:
    """Process-wide switches, before the first instrumentation reads them."""
    # The HTTP instrumentation emits the stable attribute names (http.request.method,
    # http.response.status_code, url.path) only when opted in; it reads this once per process.
    opt_in = [part.strip() for part in os.environ.get(_SEMCONV_OPT_IN, "").split(",")]
    if not {"http", "http/dup"} & set(opt_in):
        os.environ[_SEMCONV_OPT_IN] = ",".join([*filter(None, opt_in), "http"])
    current = get_global_response_propagator()  # type: ignore[no-untyped-call]
    if not isinstance(current, TraceIdResponsePropagator):
        set_global_response_propagator(TraceIdResponsePropagator())  # type: ignore[no-untyped-call]


# Where the instrumentation puts the query: the stable `url.query`, and with
# OTEL_SEMCONV_STABILITY_OPT_IN=http/dup also the old names, which carry the whole URL.
_OLD_URL_ATTRIBUTES = ("http.url", "http.target")


# In the request's ASGI `state`: the (host, port) of the trusted proxy the request came
# through (service.middleware.TrustedProxyMiddleware), whose `X-Forwarded-For` then named
# the client the scope and the span call `client`.
PROXY_PEER = "proxy_peer"


def public_query_names(app: FastAPI) -> frozenset[str]:
    """The query parameters the app's routes read (`KnownQueryRoute.query_names`), but the
    private ones. A value under any other name is one no route reads, refused with a 400 that
    names it (or a 404): a bearer token a client put in the URL, as EventSource has no header
    (`?access_token=`, `?token=`), would otherwise be in every trace of it."""
    names: set[str] = set()
    for route in every_route(app.routes):
        declared = getattr(route, "query_names", None)
        if declared is not None:
            names |= declared.names
    return frozenset(names - PRIVATE_QUERY_PARAMETERS)


def _on_server_span(span: trace.Span, scope: dict[str, Any], shown: frozenset[str]) -> None:
    """The server span, just started: the query's values out but those of `shown`, the
    proxy in."""
    if not span.is_recording():
        return
    _redact_query(span, scope, shown)
    peer = scope.get("state", {}).get(PROXY_PEER)
    if peer is not None:
        # The conventions' peer is the other end of the connection; `client.*` is the client.
        span.set_attribute("network.peer.address", peer[0])
        if peer[1]:
            span.set_attribute("network.peer.port", peer[1])


# A name no route declares stays in the trace (which one was refused) while it reads as a
# parameter's name (`stauts`, `access_token`). Anything else is not one: a bearer token sent
# as the whole query (`?eyJ...`, dots in it), or text.
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-\[\]]{0,39}")


def _shown_name(name: str, shown: frozenset[str]) -> str:
    return name if name in shown or _PARAMETER_NAME.fullmatch(name) else "REDACTED"


def _redact_query(span: trace.Span, scope: dict[str, Any], shown: frozenset[str]) -> None:
    query = scope.get("query_string")
    if not query:
        return
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if any(key not in shown for key, _ in pairs):
        redacted = urlencode(
            [(_shown_name(k, shown), v if k in shown else "REDACTED") for k, v in pairs]
        )
        span.set_attribute("url.query", redacted)
        attributes = getattr(span, "attributes", None) or {}
        for name in _OLD_URL_ATTRIBUTES:
            value = attributes.get(name)
            if isinstance(value, str) and "?" in value:
                span.set_attribute(name, f"{value.split('?', 1)[0]}?{redacted}")


def instrument_app(
    app: FastAPI,
    tracer_provider: trace.TracerProvider,
    meter_provider: MeterProvider | None = None,
) -> None:
    """One SERVER span per request, named by its route template; probes are not traced. Its
    request metrics go to `meter_provider`, or the process's."""
    _prepare_instrumentation()
    excluded = _EXCLUDED_URLS
    extra = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") or os.environ.get(
        "OTEL_PYTHON_EXCLUDED_URLS"
    )
    if extra:
        excluded = f"{excluded},{extra}"
    # Read once: `observe_app` comes last in the factory, after every router is included.
    shown = public_query_names(app)

    def on_server_span(span: trace.Span, scope: dict[str, Any]) -> None:
        _on_server_span(span, scope, shown)

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        excluded_urls=excluded,
        server_request_hook=on_server_span,
        # Given here, the list replaces the variable's: the operator's fields are kept in it.
        http_capture_headers_sanitize_fields=[
            *CREDENTIAL_HEADERS,
            *get_custom_headers(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS),
        ],
        # The per-message ASGI spans double the span count and say nothing useful here.
        exclude_spans=["receive", "send"],
    )


def instrument_engine(engine: Engine, tracer_provider: trace.TracerProvider) -> None:
    """A CLIENT span per statement (its text, never its parameters), once per engine."""
    _prepare_instrumentation()
    with _lock:
        if engine in _traced_engines:
            return
        tracer = trace.get_tracer(
            "opentelemetry.instrumentation.sqlalchemy", _SQLA_INSTR_VERSION, tracer_provider
        )
        StatementSpans(tracer, engine)
        _traced_engines.add(engine)


class StatementSpans:
    """One CLIENT span per statement, its name and attributes worked out once per statement
    text and given whole to `start_span`.

    Instead of the instrumentation's `EngineTracer`, which for every statement reads the URL
    again, runs a regex over the whole text and sets the attributes one by one (about 115 us
    of CPU per statement here), and counts pool checkouts and checkins in a metric that
    `observability.metrics` already reports from the pool. The spans have the same names and
    attributes, but for `db.operation`: the SQL keyword alone (`INSERT`), as the semantic
    conventions define it, where the instrumentation (0.66b1) gives it the span's name, the
    database's included (`INSERT todo`; opentelemetry-python-contrib issue 5042). The
    statements are prebuilt, so their texts are few; past `MAX_CACHED` a text is described
    each time rather than stored.
    """

    MAX_CACHED = 1024

    def __init__(self, tracer: trace.Tracer, engine: Engine) -> None:
        self._tracer = tracer
        url = engine.url
        self._db_name = url.database
        self._system = "postgresql" if engine.name == "postgresql" else engine.name
        base: dict[str, str | int] = {}
        if url.host:
            base["server.address"] = url.host
        if url.port:
            base["server.port"] = url.port
        if url.database:
            base["db.name"] = url.database
        if url.username:
            base["db.user"] = url.username
        self._base = base
        self._described: dict[str, tuple[str, dict[str, str | int]]] = {}
        event.listen(engine, "before_cursor_execute", self._start)
        event.listen(engine, "after_cursor_execute", _end_statement_span)
        event.listen(engine, "handle_error", _fail_statement_span)

    def _describe(self, statement: str) -> tuple[str, dict[str, str | int]]:
        described = self._described.get(statement)
        if described is not None:
            return described
        words = _LEADING_COMMENT.sub("", statement, count=1).split(None, 1)
        operation = words[0] if words else None
        name = " ".join(filter(None, (operation, self._db_name))) or self._system
        attributes: dict[str, str | int] = {
            **self._base,
            "db.statement": statement,
            "db.system": self._system,
        }
        if operation:
            attributes["db.operation"] = operation
        described = (name, attributes)
        if len(self._described) < self.MAX_CACHED:
            self._described[statement] = described
        return described

    def _start(
        self, _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        if context is None or not is_instrumentation_enabled():
            return
        name, attributes = self._describe(statement)
        context._otel_span = self._tracer.start_span(
            name, kind=trace.SpanKind.CLIENT, attributes=attributes
        )


_LEADING_COMMENT = re.compile(r"^\s*/\*.*?\*/")


def _end_statement_span(
    _conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool
) -> None:
    span = getattr(context, "_otel_span", None)
    if span is not None:
        span.end()


def _fail_statement_span(exception_context: ExceptionContext) -> None:
    span = getattr(exception_context.execution_context, "_otel_span", None)
    if span is None:
        return
    if span.is_recording():
        # The first line: the DETAIL line quotes the values (a tag's name in a unique key).
        span.set_status(Status(StatusCode.ERROR, first_line(exception_context.original_exception)))
    span.end()


def _exception_attributes(exc: BaseException) -> dict[str, str] | None:
    """A database error says past its first line what the statement's parameters were (in
    DETAIL), and SQLAlchemy's adds the statement: leave them out, here as in the logs."""
    if not holds_database_error(exc):
        return None
    orig = exc.orig if isinstance(exc, StatementError) else None
    return {
        "exception.message": first_line(orig if orig is not None else exc),
        "exception.stacktrace": format_exception(exc) + "\n",
    }


def record_server_error(exc: BaseException) -> None:
    """Mark the request's span as failed, with the exception recorded."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.record_exception(exc, attributes=_exception_attributes(exc))
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


# `error.type` of a request whose client closed the connection before it was answered (a body
# cut short): OpenTelemetry's HTTP conventions want a low-cardinality identifier of the
# failure, and no `http.response.status_code`, as none was sent.
CLIENT_CLOSED = "client_closed_request"


def record_client_closed() -> None:
    """Mark the request's span as failed before any answer: its client closed the connection.

    The instrumentation's `http.server.request.duration` takes its attributes from the answer
    it sees sent: with none, that request's point has no status code, nor `error.type`."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("error.type", CLIENT_CLOSED)
        span.set_status(Status(StatusCode.ERROR))
