"""Real OTLP/HTTP receivers on 127.0.0.1: what Jaeger's (or a collector's) port 4318 would be sent.

Each decodes its `POST /v1/...` bodies (protobuf, gzip or not): `OtlpReceiver` keeps the spans
with their resource and scope, `MetricsReceiver` the metric names and request-duration labels.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.http_helpers import LocalHttpServer, QuietHandler


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int
    events: list[str]
    scope: str
    resource: dict[str, Any]

    @classmethod
    def decode(cls, span: Span, scope: str, resource: dict[str, Any]) -> ReceivedSpan:
        return cls(
            name=span.name,
            kind=span.kind,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            attributes=attributes(span.attributes),
            status_code=span.status.code,
            events=[event.name for event in span.events],
            scope=scope,
            resource=resource,
        )


class _Receiver(LocalHttpServer):
    """Serves `PATH`, decodes each body as a `REQUEST` and hands it to `_keep`."""

    PATH: str
    REQUEST: Any
    RESPONSE: Any

    def __init__(self) -> None:
        self._lock = threading.Lock()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != receiver.PATH:
                    self.send_error(404)
                    return
                request = receiver.REQUEST()
                request.ParseFromString(body)
                receiver._keep(request)
                self.send(200, receiver.RESPONSE().SerializeToString(), "application/x-protobuf")

        super().__init__(Handler)

    def _keep(self, request: Any) -> None:
        raise NotImplementedError


class OtlpReceiver(_Receiver):
    """`with OtlpReceiver() as receiver:` then point OTEL_EXPORTER_OTLP_ENDPOINT at `.origin`."""

    PATH = "/v1/traces"
    REQUEST = ExportTraceServiceRequest
    RESPONSE = ExportTraceServiceResponse

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[ReceivedSpan] = []
        self.requests = 0

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        decoded = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    decoded.append(ReceivedSpan.decode(span, scope_spans.scope.name, resource))
        with self._lock:
            self.requests += 1
            self.spans.extend(decoded)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]


class MetricsReceiver(_Receiver):
    """Keeps every metric name, the resources, the labels of `http.server.request.duration`
    points, and the latest value of each counter's (sum's) series."""

    PATH = "/v1/metrics"
    REQUEST = ExportMetricsServiceRequest
    RESPONSE = ExportMetricsServiceResponse

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.attributes: list[dict[str, str]] = []
        self.resources: list[dict[str, Any]] = []
        # (metric name, its point's labels as sorted pairs) -> the value last pushed
        self.sums: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}

    def _keep(self, request: ExportMetricsServiceRequest) -> None:
        with self._lock:
            for resource in request.resource_metrics:
                self.resources.append(attributes(resource.resource.attributes))
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        self.names.add(metric.name)
                        if metric.WhichOneof("data") == "sum":
                            for sum_point in metric.sum.data_points:
                                labels = tuple(sorted(attributes(sum_point.attributes).items()))
                                number = sum_point.WhichOneof("value")
                                self.sums[metric.name, labels] = float(
                                    getattr(sum_point, number) if number else 0
                                )
                        if metric.name == "http.server.request.duration":
                            for point in metric.histogram.data_points:
                                self.attributes.append(
                                    {
                                        kv.key: kv.value.string_value or str(kv.value.int_value)
                                        for kv in point.attributes
                                    }
                                )
