"""Several `todo-api serve` processes against one database: the feed fans out through
PostgreSQL, whichever instance took the write, and streams end cleanly on shutdown."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.feed_helpers import FeedReader
from tests.instances import Instance
from tests.support import ApiUser


@pytest.fixture
def two_instances(database_url: str) -> Iterator[tuple[Instance, Instance]]:
    instances = [Instance(database_url), Instance(database_url)]
    try:
        for instance in instances:
            instance.wait_ready()
        yield instances[0], instances[1]
    finally:
        for instance in instances:
            instance.stop()


def feed_on(instance: Instance, user: ApiUser, **kwargs: Any) -> FeedReader:
    return FeedReader(
        instance.url, f"/api/{user.user_id}/events", headers=dict(user.headers), **kwargs
    )


def test_each_feed_gets_every_change_of_its_user_whichever_instance_wrote_it(
    two_instances: tuple[Instance, Instance], make_user: Any
) -> None:
    a, b = two_instances
    alice, bob = make_user(), make_user()
    writes_per_user = 12
    with (
        feed_on(a, alice) as alice_on_a,
        feed_on(b, alice) as alice_on_b,
        feed_on(b, bob) as bob_on_b,
        a.client() as http_a,
        b.client() as http_b,
    ):
        # A browser gets a ticket from one instance and streams from the other.
        ticket = http_a.post(f"/api/{bob.user_id}/events/tickets", headers=bob.headers).json()
        with FeedReader(b.url, ticket["stream_url"]) as bob_by_ticket_on_b:
            task_ids: dict[str, int] = {}
            clients = itertools.cycle([http_a, http_b])
            for n in range(writes_per_user):
                for user in (alice, bob):
                    http = next(clients)
                    if user.user_id not in task_ids:
                        answer = http.post(user.url(), json={"title": "t"}, headers=user.headers)
                        assert answer.status_code == 201, answer.text
                        task_ids[user.user_id] = answer.json()["id"]
                    else:
                        answer = http.put(
                            user.url(f"/{task_ids[user.user_id]}"),
                            json={"title": f"t{n}"},
                            headers=user.headers,
                        )
                        assert answer.status_code == 200, answer.text
            for reader in (alice_on_a, alice_on_b, bob_on_b, bob_by_ticket_on_b):
                reader.wait_for_seq(writes_per_user)
        expected = list(range(1, writes_per_user + 1))
        assert alice_on_a.seqs == alice_on_b.seqs == expected
        assert bob_on_b.seqs == bob_by_ticket_on_b.seqs == expected
        assert {e.json()["user_id"] for e in alice_on_a.task_events} == {alice.user_id}
        assert {e.json()["user_id"] for e in bob_on_b.task_events} == {bob.user_id}
        # Which instance wrote: both did, for each user.
        assert [e.json() for e in alice_on_a.task_events] == [
            e.json() for e in alice_on_b.task_events
        ]
        for user, http in ((alice, http_a), (bob, http_b)):
            report = http.get(f"/api/{user.user_id}/audit-events/verify", headers=user.headers)
            assert report.json()["ok"] is True
            assert report.json()["head_seq"] == writes_per_user


def test_sigterm_ends_open_streams_with_a_final_event_and_the_process_exits(
    database_url: str, make_user: Any
) -> None:
    instance = Instance(database_url)
    user = make_user()
    try:
        instance.wait_ready()
        readers = [feed_on(instance, user) for _ in range(3)]
        for reader in readers:
            reader.__enter__()
        with instance.client() as http:
            answer = http.post(user.url(), json={"title": "before"}, headers=user.headers)
            assert answer.status_code == 201
        for reader in readers:
            reader.wait_for_seq(1)
        stopped_at = time.monotonic()
        code = instance.terminate(timeout=30)
        took = time.monotonic() - stopped_at
        for reader in readers:
            end = reader.wait_for_end()
            assert end.json() == {"reason": "server_shutdown"}
            reader.close()
        # uvicorn re-raises the signal it caught once it has shut down cleanly.
        assert code in (0, -signal.SIGTERM), instance.output()
        assert "Application shutdown complete" in instance.output()
        print(f"serve exited {took:.2f} s after SIGTERM with 3 open streams")
    finally:
        instance.stop()
