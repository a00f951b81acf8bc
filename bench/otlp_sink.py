"""A discarding OTLP/HTTP trace receiver, so the benchmark pays for exporting every span.

Accepts POST /v1/traces (protobuf, optionally gzip), answers 200 with an empty
ExportTraceServiceResponse and drops the data. It counts requests, bytes and, when
opentelemetry-proto is importable, spans; GET /stats returns the counts as JSON.
It runs as its own process so its CPU is not charged to the service.

    .venv/bin/python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
except ImportError:  # pragma: no cover - the dev group installs it
    ExportTraceServiceRequest = None

_lock = threading.Lock()
_stats: dict[str, Any] = {
    "requests": 0,
    "bytes": 0,
    "spans": 0 if ExportTraceServiceRequest is not None else None,
    "errors": 0,
    "paths": {},
}


def _count_spans(body: bytes) -> int:
    message = ExportTraceServiceRequest()
    message.ParseFromString(body)
    return sum(
        len(scope.spans) for resource in message.resource_spans for scope in resource.scope_spans
    )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        spans = 0
        ok = True
        try:
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            if ExportTraceServiceRequest is not None and self.path.endswith("/v1/traces"):
                spans = _count_spans(body)
        except Exception:
            ok = False
        with _lock:
            _stats["requests"] += 1
            _stats["bytes"] += length
            if _stats["spans"] is not None:
                _stats["spans"] += spans
            _stats["errors"] += 0 if ok else 1
            _stats["paths"][self.path] = _stats["paths"].get(self.path, 0) + 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        with _lock:
            payload = json.dumps(_stats).encode()
        self.send_response(200 if self.path == "/stats" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: one line per export would only add noise and CPU."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
