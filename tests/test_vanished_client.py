"""A feed client that vanishes without closing (a lid shut, a network switched, a NAT mapping
dropped: no FIN, no RST, its packets simply lost) gives its stream's slot back soon, not after
Linux's ~15 minutes of retransmissions (service.httpserver, TCP_USER_TIMEOUT_SECONDS).

A real `todo-api serve` in a network namespace of its own, a client in another, joined by a
veth pair; the client's address is then removed, so that what the server sends is dropped
silently on the way, as on a real network. Root is needed (CI and the development machines
run as root); the namespaces are removed whatever happens. The server reaches PostgreSQL, which
is in the test's own namespace, through a relay listening inside the server's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy.engine import make_url

from service.auth import create_dev_token
from tests.serve_helpers import TODO_API
from tests.support import TEST_SECRET, clean_environ, stop_process

SERVER_IP, CLIENT_IP = "10.77.0.1", "10.77.0.2"
PORT = 8000
HEARTBEAT_SECONDS = 1
USER_TIMEOUT_SECONDS = 2
# Far more than heartbeat + user timeout, far less than Linux's ~15 minutes without them.
PATIENCE = 120
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")
_OURS = re.compile(r"todo-test-(\d+)-[0-9a-f]+-(srv|cli)")

T = TypeVar("T")

pytestmark = pytest.mark.netns  # root and iproute2: `make system-check`, which CI runs


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)
    return done.stdout


def in_namespace(name: str, make: Callable[[], T]) -> T:
    """`make()` run in a thread that entered namespace `name`: a socket made there belongs to
    it for good, whichever thread uses it later (this process stays where it is)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(_NETNS_DIR / name, os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {name}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def remove_stale_namespaces() -> None:
    """Those of runs killed before they could remove their own."""
    for path in _NETNS_DIR.glob("todo-test-*"):
        match = _OURS.fullmatch(path.name)
        if match and not Path(f"/proc/{match[1]}").exists():
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True, check=False)


@dataclass
class Relay:
    """Listens inside a namespace; each connection is piped to `target` from this one."""

    listener: socket.socket
    target: tuple[str, int]
    sockets: list[socket.socket] = field(default_factory=list)
    closed: bool = False

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                inner, _ = self.listener.accept()
                outer = socket.create_connection(self.target, timeout=10)
            except OSError:
                return
            outer.settimeout(None)
            self.sockets += [inner, outer]
            threading.Thread(target=self._pipe, args=(inner, outer), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(a, selectors.EVENT_READ, b)
            selector.register(b, selectors.EVENT_READ, a)
            with contextlib.suppress(OSError, ValueError):
                while not self.closed:
                    for key, _ in selector.select(timeout=1):
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)

    def close(self) -> None:
        self.closed = True
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@dataclass
class Network:
    server: str  # the namespaces' names
    client: str
    client_link: str
    sockets: list[socket.socket] = field(default_factory=list)

    def connect(self, namespace: str) -> socket.socket:
        sock = in_namespace(namespace, socket.socket)
        self.sockets.append(sock)
        sock.settimeout(10)
        sock.connect((SERVER_IP, PORT))
        return sock

    def black_hole_client(self) -> None:
        """The client's address gone: what reaches it is dropped, without an answer."""
        ip("-n", self.client, "addr", "flush", "dev", self.client_link)


@pytest.fixture
def network() -> Iterator[Network]:
    remove_stale_namespaces()
    tag = f"todo-test-{os.getpid()}-{secrets.token_hex(3)}"
    net = Network(f"{tag}-srv", f"{tag}-cli", "tt" + tag[-6:] + "c")
    server_link = "tt" + tag[-6:] + "s"
    made: list[str] = []
    try:
        for name in (net.server, net.client):
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip(
            *f"link add {server_link} netns {net.server} type veth".split(),
            *f"peer name {net.client_link} netns {net.client}".split(),
        )
        ip("-n", net.server, "addr", "add", f"{SERVER_IP}/24", "dev", server_link)
        ip("-n", net.client, "addr", "add", f"{CLIENT_IP}/24", "dev", net.client_link)
        ip("-n", net.server, "link", "set", server_link, "up")
        ip("-n", net.client, "link", "set", net.client_link, "up")
        # The next hop's address stays known, as a router's would: the loss is past it.
        mac = ip("-n", net.client, "-br", "link", "show", net.client_link).split()[2]
        ip(
            *f"-n {net.server} neigh replace {CLIENT_IP} lladdr {mac}".split(),
            *f"dev {server_link} nud permanent".split(),
        )
        yield net
    finally:
        for sock in net.sockets:
            sock.close()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def server(network: Network, database_url: str, tmp_path: Path) -> Iterator[Path]:
    """`todo-api serve` in the server's namespace; yields its log's path."""
    db = make_url(database_url)
    relay = Relay(
        in_namespace(network.server, socket.socket),
        (db.host or "127.0.0.1", db.port or 5432),
    )
    try:
        relay.listener.bind(("127.0.0.1", 5432))
        relay.listener.listen()
    except OSError:
        relay.close()
        raise
    relay.start()
    env = {
        "DATABASE_URL": db.set(host="127.0.0.1", port=5432).render_as_string(hide_password=False),
        "BETTER_AUTH_SECRET": TEST_SECRET,
        "FEED_MAX_STREAMS_PER_USER": "1",
        "FEED_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "TCP_USER_TIMEOUT_SECONDS": str(USER_TIMEOUT_SECONDS),
        "OTEL_SDK_DISABLED": "true",
        "LOG_FORMAT": "json",
    }
    log = tmp_path / "serve.log"
    serve = f"serve --no-migrate --host {SERVER_IP} --port {PORT} --workers 1".split()
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["ip", "netns", "exec", network.server, str(TODO_API), *serve],
            cwd=tmp_path,
            env=clean_environ(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield log
    finally:
        stop_process(process)
        relay.close()


def request(sock: socket.socket, path: str, token: str | None = None) -> int:
    """Send a GET; the response's status, its head read (the body is left unread)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {SERVER_IP}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed before a response"
        head += chunk
    return int(head.split()[1])


def wait_ready(network: Network, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError, AssertionError):
            sock = network.connect(network.client)
            if request(sock, "/readyz") == 200:
                sock.close()
                return
            sock.close()
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def test_a_vanished_clients_stream_gives_its_slot_back(network: Network, server: Path) -> None:
    user_id = f"vanish-{secrets.token_hex(4)}"
    token = create_dev_token(TEST_SECRET, user_id)
    path = f"/api/{user_id}/events"
    wait_ready(network, server)

    stream = network.connect(network.client)
    assert request(stream, path, token) == 200
    # The user's one slot (FEED_MAX_STREAMS_PER_USER=1) is held: a second stream is refused.
    with contextlib.closing(network.connect(network.server)) as sock:
        assert request(sock, path, token) == 429

    network.black_hole_client()

    # The next heartbeat goes unacknowledged; once the user timeout has passed the kernel
    # aborts the connection, the stream ends, and a new stream is accepted.
    deadline = time.monotonic() + PATIENCE
    while True:
        with contextlib.closing(network.connect(network.server)) as sock:
            status = request(sock, path, token)
        if status == 200:
            break
        assert status == 429
        assert time.monotonic() < deadline, (
            f"the vanished client's stream still held its slot after {PATIENCE} s"
        )
        time.sleep(0.5)
