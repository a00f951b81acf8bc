"""A real streaming client for the change feed (httpx + httpx-sse in a thread); no tests here."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource

from tests.reliability_helpers import wait_until


@dataclass
class FeedEvent:
    id: str
    event: str
    data: str

    @property
    def seq(self) -> int:
        return int(self.id)

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class FeedReader:
    """Reads one stream in a background thread; every event lands in `events` in order.

    `status`/`headers` are the response's; `ended` is set when the server closes the stream.
    """

    base_url: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    events: list[FeedEvent] = field(default_factory=list)
    status: int | None = None
    body: bytes = b""
    response_headers: httpx.Headers | None = None
    error: BaseException | None = None
    retry_ms: int | None = None

    def __post_init__(self) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self._queue: queue.Queue[FeedEvent] = queue.Queue()
        self._socket: socket.socket | None = None
        self._client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(60, read=120))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FeedReader:
        self._thread.start()
        if not self.started.wait(30):
            raise AssertionError("the feed did not answer")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection as a browser closing the tab would (the server sees it)."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self._client.close()

    def _run(self) -> None:
        headers = {"Accept": "text/event-stream", **self.headers}
        try:
            extra = {"params": self.params} if self.params else {}
            with self._client.stream("GET", self.path, headers=headers, **extra) as r:
                self._socket = r.extensions["network_stream"].get_extra_info("socket")
                self.status = r.status_code
                self.response_headers = r.headers
                if r.status_code != 200:
                    self.body = r.read()
                    self.started.set()
                    return
                self.started.set()
                for sse in EventSource(r).iter_sse():
                    if sse.retry is not None:
                        self.retry_ms = sse.retry
                    # As a browser: a block without data (a heartbeat, `retry:`) is no
                    # event, though httpx-sse yields one with the last id after an event.
                    if not sse.data:
                        continue
                    item = FeedEvent(id=sse.id, event=sse.event, data=sse.data)
                    self.events.append(item)
                    self._queue.put(item)
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()
            self.ended.set()

    @property
    def task_events(self) -> list[FeedEvent]:
        return [e for e in self.events if e.event != "end"]

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.task_events]

    def wait_for_seq(self, seq: int, timeout: float = 30) -> None:
        wait_until(
            lambda: (self.seqs and self.seqs[-1] >= seq) or self.ended.is_set(),
            f"event {seq} on the feed",
            timeout,
        )
        assert self.seqs and self.seqs[-1] >= seq, (self.seqs, self.status, self.error)

    def wait_for_end(self, timeout: float = 30) -> FeedEvent:
        assert self.ended.wait(timeout), "the stream did not end"
        assert self.events and self.events[-1].event == "end", self.events[-3:]
        return self.events[-1]

    def next_event(self, timeout: float = 30) -> FeedEvent:
        return self._queue.get(timeout=timeout)


def wait_listening(app: Any) -> None:
    """Until the hub's listener is verified: streams are refused (503) before."""
    wait_until(lambda: app.state.feed.state == "ok", "the feed hub to listen, verified")


def wait_streams(app: Any, count: int) -> None:
    wait_until(lambda: app.state.feed.stream_count == count, f"{count} open feed streams")


def now() -> float:
    return time.monotonic()
