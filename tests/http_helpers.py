"""A local HTTP server for tests that stand in for another service: a frontend's origin, a
JWKS endpoint, an OTLP collector, a host that must never be called.

Its own module (not tests/support.py) because tests/jwt_helpers.py, which support.py imports,
serves its JWKS with it.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class QuietHandler(BaseHTTPRequestHandler):
    """A test server's handler: no log line a request; `send` answers with a body that no
    cache keeps."""

    def log_message(self, *args: Any) -> None:
        pass

    def send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class LocalHttpServer:
    """Serves `handler` on 127.0.0.1, on a port the OS chose, from `start()` to `stop()` (or
    while the `with` block lasts); `origin` is its origin."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def start(self) -> Self:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the socket; also for a server never started (whose
        `shutdown` would wait forever)."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
