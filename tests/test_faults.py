"""Database faults: lost connections, an unreachable or hanging server, lock waits.

The contract under test: a request the database cannot serve fails fast with 503
problem+json and Retry-After (never a hang, never a 500), /readyz says so, the service
recovers by itself, and every write acknowledged with a 2xx is in the database with its
audit event. A 503 on a write means "outcome unknown" (the connection can die during COMMIT
after the server committed), so the checks are about acknowledged writes, and about nothing
ever being applied twice or without its event.
"""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from audit.chain import format_timestamp
from audit.verify import verify_chain
from service.database import Database
from service.settings import Settings
from tests.reliability_helpers import (
    TASK_ROW_LOCK,
    SilentServer,
    TcpProxy,
    TrackedApp,
    live,
    locked,
    proxied_url,
    server_address,
    terminate,
    tracked_app,
    wait_until,
)
from tests.support import ApiUser, LiveServer, MakeUser, assert_no_leak, assert_problem

ACCEPTED = {200, 201, 204, 404, 412, 503}


def assert_unavailable(resp: httpx.Response) -> None:
    """The one shape of "try again later": 503 problem+json with Retry-After, nothing leaked."""
    assert_problem(resp, 503)
    assert int(resp.headers["Retry-After"]) > 0
    assert_no_leak(resp)


@pytest.fixture
def admin(database: Database) -> sa.Engine:
    """A connection outside the app under test, to inspect and to pg_terminate_backend."""
    return database.engine


def _task_state(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "user_id": row.user_id,
        "title": row.title,
        "description": row.description,
        "completed": row.completed,
        "created_at": format_timestamp(row.created_at),
        "updated_at": format_timestamp(row.updated_at),
        "priority": row.priority,
        "due_at": format_timestamp(row.due_at) if row.due_at else None,
        "tags": list(row.tags),
        "recurrence": row.recurrence,
        "previous_task_id": row.previous_task_id,
        "next_task_id": row.next_task_id,
        "remind_at": format_timestamp(row.remind_at) if row.remind_at else None,
    }


def _norm(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """A task state with its timestamps parsed, so API JSON and audit JSON compare."""
    if state is None:
        return None
    out = dict(state)
    for name in ("created_at", "updated_at"):
        out[name] = datetime.fromisoformat(str(state[name]).replace("Z", "+00:00"))
    return out


def _events(conn: sa.Connection, user_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.text(
            "SELECT seq, action, entity_id, before, after, request_id FROM audit_events "
            "WHERE user_id = :u ORDER BY seq"
        ),
        {"u": user_id},
    )
    return [dict(row._mapping) for row in rows]


def _tasks(conn: sa.Connection, user_id: str) -> dict[int, dict[str, Any]]:
    rows = conn.execute(
        sa.text(
            "SELECT t.*, ARRAY(SELECT g.name FROM task_tags x JOIN tags g ON g.id = x.tag_id "
            "WHERE x.task_id = t.id ORDER BY lower(g.name), g.name) AS tags "
            "FROM tasks t WHERE t.user_id = :u"
        ),
        {"u": user_id},
    )
    return {int(row.id): _task_state(row) for row in rows}


def assert_consistent(conn: sa.Connection, user_id: str) -> list[dict[str, Any]]:
    """The user's chain verifies, each task's events link up (every event's `before` is the
    previous `after`, so no change happened without one), and each task is now exactly the
    `after` of its last event; a deleted task's last event is task.deleted."""
    report = verify_chain(conn, user_id)
    assert report.ok, report
    events = _events(conn, user_id)
    by_task: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        by_task[int(event["entity_id"])].append(event)
    tasks = _tasks(conn, user_id)
    assert set(tasks) <= set(by_task), "a task without any audit event"
    for task_id, history in by_task.items():
        assert history[0]["action"] == "task.created" and history[0]["before"] is None
        for previous, event in itertools.pairwise(history):
            assert previous["action"] != "task.deleted", (task_id, "changed after deletion")
            assert _norm(event["before"]) == _norm(previous["after"]), (task_id, event["seq"])
        last = history[-1]
        if last["action"] == "task.deleted":
            assert last["after"] is None and task_id not in tasks
        else:
            assert _norm(tasks[task_id]) == _norm(last["after"]), task_id
    request_ids = [event["request_id"] for event in events]
    assert len(request_ids) == len(set(request_ids)), "a request was applied twice"
    return events


def guard_enabled(conn: sa.Connection) -> bool:
    query = "SELECT tgenabled FROM pg_trigger WHERE tgname = 'tasks_audit_guard'"
    return conn.execute(sa.text(query)).scalar_one() == "A"


# One request's connection dies ---------------------------------------------------------


@dataclass
class Blocked:
    """A request running in a thread while the test holds a lock it needs."""

    future: Any

    def result(self) -> httpx.Response:
        resp: httpx.Response = self.future.result(timeout=60)
        return resp


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.mark.parametrize("lock", ["task row", "chain head"])
def test_connection_killed_mid_request_is_503_and_changes_nothing(
    settings: Settings, user: ApiUser, admin: sa.Engine, pool: ThreadPoolExecutor, lock: str
) -> None:
    """The request waits on a lock (before its write, or after the task UPDATE and before the
    audit event); its backend is terminated: 503, and neither the change nor an event stays."""
    with tracked_app(settings) as tracked, live(tracked.app) as server, server.client() as http:
        task = http.post(user.url(), json={"title": "before"}, headers=user.headers).json()
        url = user.url(f"/{task['id']}")
        with admin.connect() as conn:
            events_before = _events(conn, user.user_id)
        if lock == "task row":
            holder = locked(admin, TASK_ROW_LOCK, task)
        else:
            holder = locked(
                admin,
                "SELECT 1 FROM audit_chain_heads WHERE user_id = :u FOR UPDATE",
                {"u": user.user_id},
            )
        try:
            blocked = Blocked(
                pool.submit(http.put, url, json={"title": "after"}, headers=user.headers)
            )
            waiting = wait_until(lambda: tracked.waiting_pids(admin), "the request to wait")
            assert terminate(admin, waiting) == 1
            resp = blocked.result()
            assert_unavailable(resp)
            assert "may have been saved" not in resp.json()["detail"]  # nothing was
        finally:
            holder.rollback()
            holder.close()

        assert http.get(url, headers=user.headers).json() == task
        with admin.connect() as conn:
            assert _events(conn, user.user_id) == events_before
            assert_consistent(conn, user.user_id)
        # Recovered without a restart: the same write now succeeds.
        again = http.put(url, json={"title": "after"}, headers=user.headers)
        assert again.status_code == 200 and again.json()["title"] == "after"
    assert tracked.database.engine.pool.checkedout() == 0


def test_create_killed_before_its_event_is_retried_safely_with_its_key(
    settings: Settings, user: ApiUser, admin: sa.Engine, pool: ThreadPoolExecutor
) -> None:
    """A create that dies after its INSERT leaves no task, no event and no claimed key, so
    the client's retry with the same Idempotency-Key creates the task exactly once."""
    headers = {**user.headers, "Idempotency-Key": uuid.uuid4().hex}
    with tracked_app(settings) as tracked, live(tracked.app) as server, server.client() as http:
        http.post(user.url(), json={"title": "first"}, headers=user.headers)  # a chain head
        holder = locked(
            admin,
            "SELECT 1 FROM audit_chain_heads WHERE user_id = :u FOR UPDATE",
            {"u": user.user_id},
        )
        try:
            blocked = Blocked(
                pool.submit(http.post, user.url(), json={"title": "x"}, headers=headers)
            )
            waiting = wait_until(lambda: tracked.waiting_pids(admin), "the create to wait")
            assert terminate(admin, waiting) == 1
            assert_unavailable(blocked.result())
        finally:
            holder.rollback()
            holder.close()
        assert [t["title"] for t in http.get(user.url(), headers=user.headers).json()] == ["first"]

        retry = http.post(user.url(), json={"title": "x"}, headers=headers)
        assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
        replay = http.post(user.url(), json={"title": "x"}, headers=headers)
        assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json() == retry.json()
        titles = sorted(t["title"] for t in http.get(user.url(), headers=user.headers).json())
        assert titles == ["first", "x"]
    with admin.connect() as conn:
        events = assert_consistent(conn, user.user_id)
    assert [e["action"] for e in events] == ["task.created", "task.created"]


def test_statement_timeout_bounds_a_request_blocked_on_a_row_lock(
    settings: Settings, user: ApiUser, admin: sa.Engine
) -> None:
    """A lock held elsewhere for longer than the statement timeout is a 503, not a hang."""
    with (
        tracked_app(settings, db_statement_timeout_ms=300) as tracked,
        live(tracked.app) as server,
        server.client() as http,
    ):
        task = http.post(user.url(), json={"title": "locked"}, headers=user.headers).json()
        url = user.url(f"/{task['id']}")
        holder = locked(admin, TASK_ROW_LOCK, task)
        try:
            for method, path, body in (
                ("PUT", "", {"title": "changed"}),
                ("PATCH", "/complete", None),
                ("DELETE", "", None),
            ):
                assert_unavailable(
                    http.request(method, url + path, json=body, headers=user.headers)
                )
            assert http.get(url, headers=user.headers).json() == task  # reads do not wait
        finally:
            holder.rollback()
            holder.close()
        assert http.put(url, json={"title": "changed"}, headers=user.headers).status_code == 200
        assert tracked.database.engine.pool.checkedout() == 0
    with admin.connect() as conn:
        assert [e["action"] for e in assert_consistent(conn, user.user_id)] == [
            "task.created",
            "task.updated",
        ]


def test_a_transaction_whose_client_froze_gives_its_locks_back(
    settings: Settings, user: ApiUser, admin: sa.Engine
) -> None:
    """A worker frozen mid-transaction (a paused VM, SIGSTOP) held its users' chain heads, and
    so every write of theirs, until TCP keepalives noticed: never, its kernel still answers.
    The server now ends a transaction left idle for DB_IDLE_IN_TRANSACTION_TIMEOUT_MS."""
    head_lock = "SELECT 1 FROM audit_chain_heads WHERE user_id = :user_id FOR UPDATE"
    with (
        tracked_app(settings, db_idle_in_transaction_timeout_ms=300) as tracked,
        live(tracked.app) as server,
        server.client() as http,
    ):
        first = http.post(user.url(), json={"title": "first"}, headers=user.headers)
        assert first.status_code == 201
        frozen = tracked.database.engine.connect()  # as the requests' pool makes them
        try:
            frozen.execute(sa.text(head_lock), {"user_id": user.user_id})
            # ... and its client sends nothing more. A bound on a hang, not on speed:
            with admin.connect() as other:
                other.execute(sa.text("SET lock_timeout = '60s'"))
                other.execute(sa.text(head_lock), {"user_id": user.user_id})
                other.rollback()
            second = http.post(user.url(), json={"title": "second"}, headers=user.headers)
            assert second.status_code == 201
            with pytest.raises(sa.exc.OperationalError):  # the server ended it
                frozen.execute(sa.text("SELECT 1"))
        finally:
            frozen.close()
    with admin.connect() as conn:
        assert [e["action"] for e in assert_consistent(conn, user.user_id)] == [
            "task.created",
            "task.created",
        ]


# The database is unreachable, hangs, or goes away and comes back ----------------------


def test_database_that_accepts_but_never_answers_is_503_within_the_connect_timeout(
    settings: Settings, user: ApiUser
) -> None:
    """libpq's connect_timeout bounds the wait: the client (30 s timeout) gets its 503."""
    with SilentServer() as silent:
        url = f"postgresql://postgres@127.0.0.1:{silent.port}/todo"
        with (
            tracked_app(settings, url, db_connect_timeout_seconds=2) as tracked,
            live(tracked.app) as server,
            server.client() as http,
        ):
            assert_unavailable(http.get("/readyz"))
            assert http.get("/healthz").status_code == 200
            for method, path, body in (("GET", "", None), ("POST", "", {"title": "x"})):
                resp = http.request(method, user.url(path), json=body, headers=user.headers)
                assert_unavailable(resp)
                assert_no_leak(resp, str(silent.port))
        assert silent.accepted >= 3


def test_database_down_then_back_recovers_without_a_restart(
    settings: Settings, user: ApiUser, admin: sa.Engine
) -> None:
    """Through a proxy we can cut: 2xx, then 503s and a failing /readyz while the database is
    gone (pooled connections included), then 2xx again once it is back."""
    target = admin.url
    with TcpProxy(server_address(target)) as proxy:
        url = proxied_url(target, proxy.port)
        with (
            tracked_app(settings, url, db_connect_timeout_seconds=2) as tracked,
            live(tracked.app) as server,
            server.client() as http,
        ):
            assert http.get("/readyz").status_code == 200
            task = http.post(user.url(), json={"title": "up"}, headers=user.headers).json()
            assert tracked.database.engine.pool.checkedin() >= 1

            proxy.cut()
            assert_unavailable(http.get("/readyz"))
            for method, path, body in (
                ("GET", "", None),
                ("POST", "", {"title": "while down"}),
                ("PUT", f"/{task['id']}", {"title": "while down"}),
                ("PATCH", f"/{task['id']}/complete", None),
                ("DELETE", f"/{task['id']}", None),
            ):
                resp = http.request(method, user.url(path), json=body, headers=user.headers)
                assert_unavailable(resp)
                assert_no_leak(resp, str(proxy.port))

            proxy.restore()
            assert http.get("/readyz").status_code == 200
            assert http.get(user.url(), headers=user.headers).json() == [task]
            renamed = http.put(
                user.url(f"/{task['id']}"), json={"title": "back"}, headers=user.headers
            )
            assert renamed.status_code == 200
            assert tracked.database.engine.pool.checkedout() == 0
    with admin.connect() as conn:
        assert [e["action"] for e in assert_consistent(conn, user.user_id)] == [
            "task.created",
            "task.updated",
        ]


# libpq sends COMMIT as a simple Query message: 'Q', int32 length, "COMMIT\0".
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"


def test_connection_lost_after_the_server_committed_is_503_and_the_write_is_durable(
    settings: Settings, user: ApiUser, admin: sa.Engine
) -> None:
    """The one case where a 503 hides a success: the server committed, then the connection
    died before the app heard back. The write is there with its event, and a retry with
    the create's Idempotency-Key returns that task instead of making a second one."""
    target = admin.url
    key = uuid.uuid4().hex
    with TcpProxy(server_address(target)) as proxy:
        url = proxied_url(target, proxy.port)
        with (
            tracked_app(settings, url) as tracked,
            live(tracked.app) as server,
            server.client() as http,
        ):
            seed = http.post(user.url(), json={"title": "seed"}, headers=user.headers)
            assert seed.status_code == 201  # the user row exists: only the request commits

            proxy.drop_reply_after(COMMIT_MESSAGE)
            headers = {**user.headers, "Idempotency-Key": key}
            assert_unavailable(http.post(user.url(), json={"title": "unknown"}, headers=headers))
            assert proxy.dropped == 1
            with admin.connect() as conn:
                stored = {t["title"]: t for t in _tasks(conn, user.user_id).values()}
            assert set(stored) == {"seed", "unknown"}  # committed after all

            retry = http.post(user.url(), json={"title": "unknown"}, headers=headers)
            assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
            assert retry.json()["id"] == stored["unknown"]["id"]

            task_url = user.url(f"/{seed.json()['id']}")
            proxy.drop_reply_after(COMMIT_MESSAGE)
            assert_unavailable(http.put(task_url, json={"title": "renamed"}, headers=user.headers))
            assert proxy.dropped == 2
            assert http.get(task_url, headers=user.headers).json()["title"] == "renamed"
            assert tracked.database.engine.pool.checkedout() == 0
    with admin.connect() as conn:
        events = assert_consistent(conn, user.user_id)
        assert [e["action"] for e in events] == ["task.created", "task.created", "task.updated"]
        assert len(_tasks(conn, user.user_id)) == 2


def test_a_write_whose_commit_went_unanswered_says_it_may_have_been_saved(
    settings: Settings, user: ApiUser, admin: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 whose COMMIT was sent but never answered does not say "try again shortly": the
    change may be saved (here it is), and a toggle retried on that advice undoes it. It says
    the change may have been saved, as a write cancelled mid-commit at shutdown does, and the
    log says which case it was."""
    target = admin.url
    with TcpProxy(server_address(target)) as proxy:
        url = proxied_url(target, proxy.port)
        with (
            tracked_app(settings, url) as tracked,
            live(tracked.app) as server,
            server.client() as http,
        ):
            task = http.post(user.url(), json={"title": "t"}, headers=user.headers).json()
            task_url = user.url(f"/{task['id']}")

            proxy.drop_reply_after(COMMIT_MESSAGE)
            toggled = http.patch(f"{task_url}/complete", headers=user.headers)
            assert proxy.dropped == 1
            assert_unavailable(toggled)
            detail = toggled.json()["detail"]
            assert "may have been saved" in detail and "Reload before retrying" in detail
            assert "try again shortly" not in detail
            assert http.get(task_url, headers=user.headers).json()["completed"] is True
            assert tracked.database.engine.pool.checkedout() == 0
    lost = [r for r in caplog.records if getattr(r, "commit_uncertain", None) is True]
    assert [r.getMessage() for r in lost] == [
        "database connection lost during commit: the change may have been saved"
    ]


def test_idle_pooled_connections_closed_by_the_server_are_never_handed_out(
    settings: Settings, make_user: MakeUser, admin: sa.Engine
) -> None:
    """What Neon does to idle connections: the server closes them while they sit in the pool.
    Every request afterwards still succeeds (the pool tests a connection before lending it)."""
    users = [make_user() for _ in range(2)]
    with tracked_app(settings) as tracked, live(tracked.app) as server, server.client() as http:
        for user in users:
            assert http.post(user.url(), json={"title": "warm"}, headers=user.headers).is_success
        engine = tracked.database.engine
        held = [engine.connect() for _ in range(4)]  # four connections open at once ...
        for conn in held:
            conn.close()  # ... and back in the pool, idle
        assert engine.pool.checkedin() >= 4
        idle = tracked.live_pids(admin, state="idle")
        assert len(idle) >= 4
        assert terminate(admin, idle) == len(idle)
        opened = len(tracked.pids)

        for round_ in range(2 * len(idle)):
            user = users[round_ % len(users)]
            resp = http.get(user.url(), headers=user.headers)
            assert resp.status_code == 200, resp.text
            created = http.post(user.url(), json={"title": f"r{round_}"}, headers=user.headers)
            assert created.status_code == 201, created.text
        assert http.get("/readyz").status_code == 200
        assert len(tracked.pids) > opened  # the dead ones were replaced by new connections
        assert not set(tracked.live_pids(admin)) & set(idle)


# Fault injection under concurrent load -------------------------------------------------

KILL_ROUNDS = 12
CLIENTS_PER_USER = 2
MAX_OPS_PER_CLIENT = 400
CREATE_RETRIES = 30


@dataclass
class Call:
    op: str
    user_id: str
    task_id: int | None
    request_id: str
    status: int
    body: Any
    key: str | None = None
    etag: str | None = None


@dataclass
class Ledger:
    """What the clients sent and what they were told."""

    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def record(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def pick(self, user_id: str, rng: random.Random) -> int | None:
        with self.lock:
            ids = self.ids[user_id]
            return rng.choice(ids) if ids else None

    def add(self, user_id: str, task_id: int) -> None:
        with self.lock:
            self.ids[user_id].append(task_id)

    def drop(self, user_id: str, task_id: int) -> None:
        with self.lock:
            if task_id in self.ids[user_id]:
                self.ids[user_id].remove(task_id)


def _send(
    http: httpx.Client,
    ledger: Ledger,
    op: str,
    user: ApiUser,
    task_id: int | None,
    *,
    key: str | None = None,
    if_match: str | None = None,
    **kw: Any,
) -> Call:
    """One request with its own X-Request-ID (which its audit event will carry), recorded."""
    request_id = uuid.uuid4().hex
    headers = {**user.headers, "X-Request-ID": request_id}
    if key is not None:
        headers["Idempotency-Key"] = key
    if if_match is not None:
        headers["If-Match"] = if_match
    method, path = {
        "create": ("POST", ""),
        "update": ("PUT", f"/{task_id}"),
        "toggle": ("PATCH", f"/{task_id}/complete"),
        "delete": ("DELETE", f"/{task_id}"),
        "get": ("GET", f"/{task_id}"),
    }[op]
    resp = http.request(method, user.url(path), headers=headers, **kw)
    if resp.status_code >= 400:
        assert_problem(resp, resp.status_code)
        assert_no_leak(resp)
    if resp.status_code == 503:
        assert int(resp.headers["Retry-After"]) > 0
    body = resp.json() if resp.content else None
    call = Call(
        op, user.user_id, task_id, request_id, resp.status_code, body, key, resp.headers.get("ETag")
    )
    ledger.record(call)
    return call


def _client_loop(
    server: LiveServer, user: ApiUser, ledger: Ledger, stop: threading.Event, seed: int
) -> None:
    rng = random.Random(seed)
    with server.client() as http:
        for n in range(MAX_OPS_PER_CLIENT):
            if stop.is_set():
                return
            task_id = ledger.pick(user.user_id, rng)
            roll = rng.random()
            if task_id is None or roll < 0.25:
                key = uuid.uuid4().hex
                for _ in range(CREATE_RETRIES):  # a client retrying a 503'd create with its key
                    title = f"t{seed}-{n}"
                    call = _send(http, ledger, "create", user, None, key=key, json={"title": title})
                    if call.status != 503:
                        break
                if call.status == 201:
                    ledger.add(user.user_id, call.body["id"])
            elif roll < 0.5:
                if_match = None
                if rng.random() < 0.3:  # a conditional update, with a fresh or a stale tag
                    read = _send(http, ledger, "get", user, task_id)
                    stale = f'"{task_id}-0"'
                    if_match = stale if read.etag is None or rng.random() < 0.2 else read.etag
                body = {"title": f"u{seed}-{n}", "description": f"d{n}"}
                _send(http, ledger, "update", user, task_id, if_match=if_match, json=body)
            elif roll < 0.8:
                _send(http, ledger, "toggle", user, task_id)
            elif roll < 0.9:
                call = _send(http, ledger, "delete", user, task_id)
                if call.status in (204, 404):
                    ledger.drop(user.user_id, task_id)
            else:
                _send(http, ledger, "get", user, task_id)


def _killer(tracked: TrackedApp, admin: sa.Engine, stop: threading.Event) -> list[tuple[int, int]]:
    """Terminate all of the app's connections, several times, each time while at least one
    of them is in the middle of a request; returns (busy, killed) per round."""
    rounds = []
    for _ in range(KILL_ROUNDS):
        busy = wait_until(
            lambda: (
                tracked.live_pids(admin, state="active")
                or tracked.live_pids(admin, state="idle in transaction")
            ),
            "a busy connection",
        )
        killed = terminate(admin, tracked.live_pids(admin))
        rounds.append((len(busy), killed))
        stop.wait(0.15)
    return rounds


def test_terminated_connections_lose_no_acknowledged_write(
    settings: Settings, make_user: MakeUser, admin: sa.Engine
) -> None:
    """Six clients (two per user) create, update (some with If-Match), toggle, delete and read
    while every connection of the app is terminated, twelve times. Clients see only 2xx, 404,
    412 or 503 (creates are retried with their Idempotency-Key after a 503). Afterwards the
    database holds every acknowledged write with its event (matched by X-Request-ID), no
    request applied twice, one task per key, consistent histories and verifying chains."""
    users = [make_user() for _ in range(3)]
    ledger = Ledger()
    stop = threading.Event()
    with tracked_app(settings) as tracked, live(tracked.app) as server:
        with server.client() as http:
            for user in users:
                for i in range(3):
                    task = http.post(user.url(), json={"title": f"seed {i}"}, headers=user.headers)
                    assert task.status_code == 201
                    ledger.add(user.user_id, task.json()["id"])
        clients = [
            (user, seed)
            for seed, user in enumerate(u for u in users for _ in range(CLIENTS_PER_USER))
        ]
        with ThreadPoolExecutor(len(clients) + 1) as executor:
            running = [
                executor.submit(_client_loop, server, user, ledger, stop, seed)
                for user, seed in clients
            ]
            killer = executor.submit(_killer, tracked, admin, stop)
            try:
                rounds = killer.result(timeout=120)
            finally:
                stop.set()
                for future in running:
                    future.result(timeout=120)

        # Recovered: each user can read and write again, without a restart.
        with server.client() as http:
            assert http.get("/readyz").status_code == 200
            for user in users:
                assert http.get(user.url(), headers=user.headers).status_code == 200
                assert (
                    http.post(user.url(), json={"title": "after"}, headers=user.headers).status_code
                    == 201
                )
        assert tracked.database.engine.pool.checkedout() == 0

    assert all(killed >= 1 for _, killed in rounds), rounds
    statuses = Counter(call.status for call in ledger.calls)
    assert set(statuses) <= ACCEPTED, statuses
    print(f"kill rounds (busy, killed): {rounds}; statuses: {dict(statuses)}")

    with admin.connect() as conn:
        assert guard_enabled(conn)
        events = {user.user_id: assert_consistent(conn, user.user_id) for user in users}
        keys = {
            (row.user_id, row.key): row.response_body
            for row in conn.execute(
                sa.text(
                    "SELECT user_id, key, response_body FROM idempotency_keys "
                    "WHERE user_id = ANY(:u)"
                ),
                {"u": [user.user_id for user in users]},
            )
        }
    by_request = {e["request_id"]: e for user_events in events.values() for e in user_events}
    sent = {call.request_id for call in ledger.calls}
    seed_events = {e["request_id"] for e in by_request.values()} - sent
    assert all(by_request[r]["after"]["title"].startswith(("seed ", "after")) for r in seed_events)

    attempts: dict[str, list[Call]] = defaultdict(list)
    for call in ledger.calls:
        event = by_request.get(call.request_id)
        if call.op == "create":
            assert call.key is not None
            attempts[call.key].append(call)
            continue
        if call.op == "get":
            if call.status == 200:  # a read only ever shows a committed, audited state
                history = [
                    e["after"] for e in events[call.user_id] if e["entity_id"] == str(call.task_id)
                ]
                assert _norm(call.body) in [_norm(after) for after in history]
            continue
        if call.status in (404, 412):
            assert event is None, call
        elif call.status == 200:  # acknowledged update or toggle: its event, with its result
            assert event is not None, call
            expected = (
                ("task.updated",) if call.op == "update" else ("task.completed", "task.reopened")
            )
            assert event["action"] in expected and event["entity_id"] == str(call.task_id)
            assert _norm(event["after"]) == _norm(call.body)
        elif call.status == 204:  # acknowledged delete
            assert event is not None, call
            assert event["action"] == "task.deleted" and event["entity_id"] == str(call.task_id)
        else:
            assert call.status == 503  # outcome unknown; at most once (request ids are unique)

    for key, tries in attempts.items():
        created = [by_request[c.request_id] for c in tries if c.request_id in by_request]
        assert len(created) <= 1, (key, created)  # one task per key, retries or not
        final = tries[-1]
        if final.status == 201:
            assert len(created) == 1, (key, tries)
            assert created[0]["action"] == "task.created"
            assert int(created[0]["entity_id"]) == final.body["id"]
            assert _norm(created[0]["after"]) == _norm(final.body)
            assert keys[(final.user_id, key)]["id"] == final.body["id"]
        else:
            assert final.status == 503, final
