"""Many users writing at once over real HTTP: every chain stays gapless and verifies.

Two client threads per user, so appends to one chain contend for its head lock while twenty
chains are written in parallel.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from audit.verify import verify_chain
from service.database import Database
from service.settings import Settings
from tests.audit_helpers import events_of, json_lines, run_cli

USERS = 20
THREADS_PER_USER = 2
CHANGES_PER_THREAD = 25  # 50 per user
TASKS_PER_THREAD = 3


def write_changes(server: Any, user: Any, worker: int, start: threading.Barrier) -> Counter[int]:
    """25 changes, each a real one (no no-ops): 3 creates, 21 edits or toggles, 1 delete."""
    statuses: Counter[int] = Counter()
    with server.client(headers=user.headers) as http:
        base = f"/api/{user.user_id}/tasks"
        start.wait()
        ids = []
        for n in range(TASKS_PER_THREAD):
            response = http.post(base, json={"title": f"w{worker} task {n}"})
            statuses[response.status_code] += 1
            ids.append(response.json()["id"])
        for n in range(CHANGES_PER_THREAD - TASKS_PER_THREAD - 1):
            task_id = ids[n % TASKS_PER_THREAD]
            if n % 2:
                response = http.patch(f"{base}/{task_id}/complete")
            else:
                response = http.put(f"{base}/{task_id}", json={"title": f"w{worker} edit {n}"})
            statuses[response.status_code] += 1
        statuses[http.delete(f"{base}/{ids[0]}").status_code] += 1
    return statuses


def verify_meanwhile(
    server: Any, users: list[Any], start: threading.Barrier, done: threading.Event
) -> int:
    """Verify chains while they are being written; each verification reads one snapshot."""
    rounds = 0
    with server.client() as http:
        start.wait()
        while not done.is_set() or rounds == 0:
            for user in users:
                response = http.get(
                    f"/api/{user.user_id}/audit-events/verify", headers=user.headers
                )
                assert response.status_code == 200
                assert response.json()["ok"] is True, response.json()
            rounds += 1
    return rounds


def test_concurrent_users_keep_gapless_verifiable_chains(
    live_server: Any, make_user: Any, database: Database, settings: Settings
) -> None:
    users = [make_user() for _ in range(USERS)]
    workers = [(user, n) for user in users for n in range(THREADS_PER_USER)]
    start = threading.Barrier(len(workers) + 1)
    done = threading.Event()
    with ThreadPoolExecutor(max_workers=len(workers) + 1) as pool:
        checks = pool.submit(verify_meanwhile, live_server, users[:3], start, done)
        results = [pool.submit(write_changes, live_server, user, n, start) for user, n in workers]
        try:
            statuses = sum((future.result() for future in results), Counter[int]())
        finally:
            done.set()
        # Verifying while the chains grow never saw a half-written state.
        assert checks.result() >= 1

    # Every change succeeded: no 5xx (a deadlock or lock timeout would be one), no 409/412.
    writers = USERS * THREADS_PER_USER
    assert set(statuses) == {200, 201, 204}
    assert statuses[201] == writers * TASKS_PER_THREAD
    assert statuses[204] == writers
    assert statuses.total() == writers * CHANGES_PER_THREAD

    per_user = THREADS_PER_USER * CHANGES_PER_THREAD
    with live_server.client() as http, database.engine.connect() as conn:
        for user in users:
            events = events_of(database.engine, user.user_id)
            assert [e["seq"] for e in events] == list(range(1, per_user + 1))
            # The checks made meanwhile stored verified points; the full check ignores them.
            report = http.get(
                f"/api/{user.user_id}/audit-events/verify?full=true", headers=user.headers
            )
            assert report.status_code == 200
            assert report.json() == {
                "ok": True,
                "events": per_user,
                "head_seq": per_user,
                "head_hash": events[-1]["hash"],
                "first_bad_seq": None,
                "reason": None,
                "verified_from_seq": 0,
            }
            assert verify_chain(conn, user.user_id, batch_size=7).ok
            status, out, _ = run_cli(settings, "audit", "verify", "--user", user.user_id)
            assert status == 0
            assert json_lines(out)[-1]["ok"] is True
