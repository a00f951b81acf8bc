"""The tag endpoints over HTTP: listing with counts, creation (case-insensitive uniqueness,
first spelling kept), rename and delete (each affected task audited in the same
transaction), ownership (another user's tag is 404) and validation."""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from audit.recorder import AuditContext
from service.database import Database
from service.tags import queries as tag_queries
from service.tags.rules import TAG_NAME_MAX, TAGS_PER_USER_MAX, sorted_names
from service.tasks import rules
from tests.audit_helpers import events_of
from tests.reliability_helpers import TASK_ROW_LOCK, lock_waiter, lock_waits, locked, wait_until
from tests.support import ApiUser, LiveServer, assert_problem, assert_validation_error
from tests.support import create_task as create


def tags_url(user: ApiUser, path: str = "") -> str:
    return f"/api/{user.user_id}/tags{path}"


def list_tags(client: TestClient, user: ApiUser) -> list[dict[str, Any]]:
    resp = client.get(tags_url(user), headers=user.headers)
    assert resp.status_code == 200, resp.text
    result: list[dict[str, Any]] = resp.json()
    return result


def test_create_list_and_get(client: TestClient, user: ApiUser) -> None:
    resp = client.post(tags_url(user), json={"name": "  Work  "}, headers=user.headers)
    assert resp.status_code == 201, resp.text
    tag = resp.json()
    assert set(tag) == {"id", "name", "task_count", "created_at"}
    assert (tag["name"], tag["task_count"]) == ("Work", 0)
    assert resp.headers["Location"].endswith(f"/api/{user.user_id}/tags/{tag['id']}")
    got = client.get(tags_url(user, f"/{tag['id']}"), headers=user.headers)
    assert got.json() == tag
    create(client, user, "A", tags=["work", "home"])
    create(client, user, "B", tags=["Home"])
    assert [(t["name"], t["task_count"]) for t in list_tags(client, user)] == [
        ("home", 2),
        ("Work", 1),
    ]


def test_names_are_unique_ignoring_case_and_the_first_spelling_stays(
    client: TestClient, user: ApiUser
) -> None:
    first = client.post(tags_url(user), json={"name": "Work"}, headers=user.headers)
    again = client.post(tags_url(user), json={"name": "wORK"}, headers=user.headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["name"] == "Work"
    assert [t["name"] for t in list_tags(client, user)] == ["Work"]


def test_a_create_that_loses_the_race_for_a_name_answers_200(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """Two creates of one name: the one whose insert waited for the other's and then did
    nothing did not create the tag, so it answers 200 with the winner's tag, not 201."""
    with live_server.client(headers=user.headers) as http:
        assert http.get(tags_url(user)).status_code == 200  # the user exists
        with database.engine.connect() as rival:
            rival_id = rival.execute(
                sa.text(
                    "INSERT INTO tags (user_id, name, created_at) "
                    "VALUES (:u, 'Errands', now()) RETURNING id"
                ),
                {"u": user.user_id},
            ).scalar_one()
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(http.post, tags_url(user), json={"name": "errands"})
                waiting = f"INSERT INTO tags%{user.user_id}%"
                wait_until(lambda: lock_waiter(database.engine, waiting), "the create to wait")
                rival.commit()
                resp = answer.result(timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["id"] == rival_id and resp.json()["name"] == "Errands"
        assert "Location" not in resp.headers
        assert [t["id"] for t in http.get(tags_url(user)).json()] == [rival_id]


def test_another_users_tag_is_404(client: TestClient, user: ApiUser, make_user: Any) -> None:
    other = make_user()
    theirs = client.post(tags_url(other), json={"name": "secret"}, headers=other.headers).json()
    task = create(client, other, "Theirs", tags=["secret"])
    for method, body in (("GET", None), ("PATCH", {"name": "mine"}), ("DELETE", None)):
        resp = client.request(
            method, tags_url(user, f"/{theirs['id']}"), json=body, headers=user.headers
        )
        assert_problem(resp, 404)
    # Their tag and task are untouched; my list does not show it; the same name is mine anew.
    assert [t["name"] for t in list_tags(client, other)] == ["secret"]
    assert client.get(other.url(f"/{task['id']}"), headers=other.headers).json()["tags"] == [
        "secret"
    ]
    assert list_tags(client, user) == []
    mine = client.post(tags_url(user), json={"name": "Secret"}, headers=user.headers)
    assert mine.status_code == 201 and mine.json()["id"] != theirs["id"]
    # And another user's token cannot reach my tags at all.
    assert_problem(client.get(tags_url(other), headers=user.headers), 403)


def test_an_id_written_otherwise_does_not_address_the_tag(
    client: TestClient, user: ApiUser
) -> None:
    """As for a task's id: `1.0`, `+1`, `01` or ` 1` are not the id the API gave out, but
    int() read each as it (a DELETE of `/tags/1.0` deleted tag 1). 400 on the path, and the
    tag is untouched."""
    tag = client.post(tags_url(user), json={"name": "keep"}, headers=user.headers).json()
    number = tag["id"]
    for alias in (f"{number}.0", f"+{number}", f"0{number}", f"%20{number}", f"{number}%20"):
        for method, body in (("GET", None), ("PATCH", {"name": "renamed"}), ("DELETE", None)):
            resp = client.request(
                method, tags_url(user, f"/{alias}"), json=body, headers=user.headers
            )
            assert_validation_error(resp, "path.tag_id")
    assert list_tags(client, user) == [tag]


def test_rename_is_recorded_on_every_tagged_task(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    tag = client.post(tags_url(user), json={"name": "wrk"}, headers=user.headers).json()
    tagged = [create(client, user, f"T{i}", tags=["wrk", "other"]) for i in range(3)]
    untagged = create(client, user, "Untagged", tags=["other"])
    before = len(events_of(database.engine, user.user_id))
    resp = client.patch(
        tags_url(user, f"/{tag['id']}"), json={"name": "Work"}, headers=user.headers
    )
    assert resp.status_code == 200, resp.text
    assert (resp.json()["name"], resp.json()["task_count"]) == ("Work", 3)
    events = events_of(database.engine, user.user_id)[before:]
    assert sorted(int(e["entity_id"]) for e in events) == [t["id"] for t in tagged]
    for event in events:
        assert event["action"] == "task.updated"
        assert event["changes"] == {"tags": [["other", "wrk"], ["other", "Work"]]}
    for task in tagged:
        now = client.get(user.url(f"/{task['id']}"), headers=user.headers)
        assert now.json()["tags"] == ["other", "Work"]
        assert now.headers["ETag"] != f'"{task["id"]}-1"'
    assert client.get(user.url(f"/{untagged['id']}"), headers=user.headers).json()["tags"] == [
        "other"
    ]


def test_rename_to_another_tags_name_is_409(client: TestClient, user: ApiUser) -> None:
    a = client.post(tags_url(user), json={"name": "a"}, headers=user.headers).json()
    client.post(tags_url(user), json={"name": "B"}, headers=user.headers)
    body = assert_problem(
        client.patch(tags_url(user, f"/{a['id']}"), json={"name": "b"}, headers=user.headers),
        409,
    )
    assert body["type"].endswith("/tag-conflict")
    # Changing only the case of its own name is a rename.
    resp = client.patch(tags_url(user, f"/{a['id']}"), json={"name": "A"}, headers=user.headers)
    assert resp.status_code == 200 and resp.json()["name"] == "A"


def test_rename_into_a_clash_only_postgresql_folds_is_409(
    client: TestClient, user: ApiUser
) -> None:
    """Python lower-cases a final capital sigma to the final form, PostgreSQL's lower() to
    the medial one: the unique index sees the clash the lookup missed; 409, not 500."""
    client.post(tags_url(user), json={"name": "οδοσ"}, headers=user.headers)
    other = client.post(tags_url(user), json={"name": "x"}, headers=user.headers).json()
    url = tags_url(user, f"/{other['id']}")
    resp = client.patch(url, json={"name": "ΟΔΟΣ"}, headers=user.headers)
    assert assert_problem(resp, 409)["type"].endswith("/tag-conflict")
    assert sorted(t["name"] for t in list_tags(client, user)) == ["x", "οδοσ"]


@pytest.mark.parametrize("name", ["ΟΔΟΣ", "İstanbul"])
def test_a_name_python_and_postgresql_lower_differently_is_one_tag(
    client: TestClient, user: ApiUser, name: str
) -> None:
    """PostgreSQL's lower() is the only key: Python's differs for these ('οδος', 'i̇stanbul'),
    and a lookup keyed by Python never found the tag it had just inserted (409)."""
    first = client.post(tags_url(user), json={"name": name}, headers=user.headers)
    assert first.status_code == 201, first.text
    again = client.post(tags_url(user), json={"name": name}, headers=user.headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    task = create(client, user, "T", tags=[name, "other"])
    assert task["tags"] == sorted_names([name, "other"])
    other_task = create(client, user, "U", tags=[name])
    assert other_task["tags"] == [name]
    renamed = client.patch(
        tags_url(user, f"/{first.json()['id']}"), json={"name": name}, headers=user.headers
    )
    assert renamed.status_code == 200, renamed.text
    counts = {t["name"]: t["task_count"] for t in list_tags(client, user)}
    assert counts == {name: 2, "other": 1}


def test_a_longest_name_of_multibyte_characters_is_found_again(
    client: TestClient, user: ApiUser
) -> None:
    """100 bytes of UTF-8: the lookup compares whole names (a name type would cut at 63)."""
    name = "Ü" * TAG_NAME_MAX
    first = client.post(tags_url(user), json={"name": name}, headers=user.headers)
    assert first.status_code == 201, first.text
    assert create(client, user, "T", tags=[name.lower()])["tags"] == [name]
    again = client.post(tags_url(user), json={"name": name}, headers=user.headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_names_postgresql_folds_together_in_one_request_are_one_tag(
    client: TestClient, user: ApiUser
) -> None:
    """'ΟΔΟΣ' and 'οδοσ' are different to Python, one key to PostgreSQL: the task gets the
    tag once, spelled as stored."""
    task = create(client, user, "T", tags=["οδοσ", "ΟΔΟΣ"])
    assert task["tags"] == ["οδοσ"]
    assert [(t["name"], t["task_count"]) for t in list_tags(client, user)] == [("οδοσ", 1)]


@pytest.mark.parametrize("names", [["ΟΔΟΣ", "οδος"], ["İstanbul", "i̇stanbul"]])
def test_names_only_python_folds_together_are_the_tags_postgresql_makes_of_them(
    database: Database, client: TestClient, user: ApiUser, names: list[str]
) -> None:
    """Python lower-cases both names of each pair alike ('οδος', 'i̇stanbul'); PostgreSQL's
    lower(), the only key, may not ('οδοσ' and 'οδος'). Folded by Python first, the second
    name was dropped: the task carried one of the two tags it was given, and a list filtered
    by both found nothing."""
    with database.engine.connect() as conn:
        one_key = conn.execute(sa.select(sa.func.lower(names[0]) == sa.func.lower(names[1])))
        expected = names[:1] if one_key.scalar_one() else sorted_names(names)
    assert create(client, user, "T", tags=names)["tags"] == expected
    updated = client.put(
        user.url(f"/{create(client, user, 'U')['id']}"), json={"tags": names}, headers=user.headers
    )
    assert updated.status_code == 200 and updated.json()["tags"] == expected
    assert sorted_names([t["name"] for t in list_tags(client, user)]) == expected
    both = client.get(user.url(), params={"tag": names}, headers=user.headers)
    assert [t["title"] for t in both.json()] == ["U", "T"]


def test_names_folded_into_one_tag_count_once_against_the_maximum(
    database: Database, client: TestClient, user: ApiUser
) -> None:
    """One short of the limit, two spellings of one new name make one tag: not a 409."""
    assert client.get(tags_url(user), headers=user.headers).status_code == 200
    _seed_tags(database, user, TAGS_PER_USER_MAX - 1)
    assert create(client, user, "T", tags=["New", "new", "NEW"])["tags"] == ["New"]
    assert _tag_count(database, user) == TAGS_PER_USER_MAX


def test_delete_removes_the_tag_from_tasks_and_audits_each(
    client: TestClient, user: ApiUser, database: Database
) -> None:
    tasks = [create(client, user, f"T{i}", tags=["gone", "kept"]) for i in range(2)]
    tag_id = next(t["id"] for t in list_tags(client, user) if t["name"] == "gone")
    before = len(events_of(database.engine, user.user_id))
    resp = client.delete(tags_url(user, f"/{tag_id}"), headers=user.headers)
    assert resp.status_code == 204
    events = events_of(database.engine, user.user_id)[before:]
    assert [e["action"] for e in events] == ["task.updated", "task.updated"]
    assert {int(e["entity_id"]) for e in events} == {t["id"] for t in tasks}
    assert all(e["changes"] == {"tags": [["gone", "kept"], ["kept"]]} for e in events)
    assert len({e["xact_id"] for e in events}) == 1  # one transaction
    for task in tasks:
        assert client.get(user.url(f"/{task['id']}"), headers=user.headers).json()["tags"] == [
            "kept"
        ]
    assert_problem(client.get(tags_url(user, f"/{tag_id}"), headers=user.headers), 404)
    assert_problem(client.delete(tags_url(user, f"/{tag_id}"), headers=user.headers), 404)
    verify = client.get(f"/api/{user.user_id}/audit-events/verify", headers=user.headers).json()
    assert verify["ok"] is True


def test_deleting_a_task_keeps_its_tags_for_other_tasks(client: TestClient, user: ApiUser) -> None:
    a = create(client, user, "A", tags=["shared"])
    create(client, user, "B", tags=["shared"])
    assert client.delete(user.url(f"/{a['id']}"), headers=user.headers).status_code == 204
    assert [(t["name"], t["task_count"]) for t in list_tags(client, user)] == [("shared", 1)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": ""}, "at least 1 character"),
        ({"name": "   "}, "a tag name must not be blank"),
        ({"name": "x" * 51}, "at most 50 characters"),
        ({"name": "tab\there"}, "control characters"),
        ({"name": "nul\x00"}, "control characters"),
        ({"name": None}, "valid string"),
        ({}, "Field required"),
        ({"name": "ok", "color": "red"}, "Extra inputs"),
    ],
)
def test_tag_name_validation(
    client: TestClient, user: ApiUser, body: dict[str, Any], message: str
) -> None:
    error = assert_validation_error(client.post(tags_url(user), json=body, headers=user.headers))
    assert message in " ".join(e["message"] for e in error["errors"]), error
    tag = client.post(tags_url(user), json={"name": "fine"}, headers=user.headers).json()
    error = assert_validation_error(
        client.patch(tags_url(user, f"/{tag['id']}"), json=body, headers=user.headers)
    )
    assert list_tags(client, user)[0]["name"] == "fine"


def test_fifty_characters_after_trimming_is_allowed(client: TestClient, user: ApiUser) -> None:
    name = "y" * 50
    resp = client.post(tags_url(user), json={"name": f"  {name}  "}, headers=user.headers)
    assert resp.status_code == 201 and resp.json()["name"] == name


def test_tables_enforce_ownership(database: Database, client: TestClient, make_user: Any) -> None:
    """The composite foreign keys refuse a link between one user's task and another's tag."""
    alice, bob = make_user(), make_user()
    task = create(client, alice, "Alice's")
    tag = client.post(tags_url(bob), json={"name": "bobs"}, headers=bob.headers).json()
    with pytest.raises(sa.exc.IntegrityError), database.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO task_tags (task_id, tag_id, user_id) VALUES (:t, :g, :u)"),
            {"t": task["id"], "g": tag["id"], "u": alice.user_id},
        )


@pytest.mark.parametrize("query", ["tagged_task_ids", "rename", "remove", "set_links"])
def test_a_tag_query_with_another_owner_finds_and_changes_nothing(
    database: Database, client: TestClient, user: ApiUser, make_user: Any, query: str
) -> None:
    """Each statement on a tag or a task's links names the owner as well as the ids: run
    without the locks that check the owner first (`lock_tag`, `lock_task`), with another
    user's id and this user's tag or task, it finds no row and changes nothing."""
    task = create(client, user, "Tagged", tags=["mine"])
    (tag,) = list_tags(client, user)
    other = make_user().user_id
    with database.unit_of_work() as session:
        if query == "tagged_task_ids":
            assert tag_queries.tagged_task_ids(session, other, tag["id"]) == []
            assert tag_queries.tagged_task_ids(session, user.user_id, tag["id"]) == [task["id"]]
        elif query == "rename":
            tag_queries.rename(session, other, tag["id"], "taken")
        elif query == "remove":
            tag_queries.remove(session, other, tag["id"])
        else:
            tag_queries.set_links(session, other, task["id"], [])
    assert list_tags(client, user) == [tag]
    got = client.get(user.url(f"/{task['id']}"), headers=user.headers)
    assert got.json() == task


@pytest.mark.parametrize("change", ["rename", "delete"])
def test_a_tag_change_leaves_out_a_task_deleted_while_it_waited(
    database: Database, live_server: LiveServer, user: ApiUser, change: str
) -> None:
    """The tag's change waits for a task that is then deleted: it records the other tasks and
    answers 2xx (it was a 404 'Task N not found' and the change was lost)."""
    with live_server.client(headers=user.headers) as http:
        kept, gone = (create(http, user, title, tags=["shared"]) for title in ("kept", "gone"))
        tag = list_tags(http, user)[0]  # type: ignore[arg-type]
        before = len(events_of(database.engine, user.user_id))
        holder = locked(database.engine, TASK_ROW_LOCK, {"id": gone["id"]})
        with ThreadPoolExecutor(2) as pool:
            deletion = pool.submit(http.delete, user.url(f"/{gone['id']}"))
            wait_until(lambda: lock_waits(database.engine) == 1, "the task's delete to wait")
            if change == "rename":
                answer = pool.submit(
                    http.patch, tags_url(user, f"/{tag['id']}"), json={"name": "S"}
                )
            else:
                answer = pool.submit(http.delete, tags_url(user, f"/{tag['id']}"))
            wait_until(lambda: lock_waits(database.engine) == 2, "the tag's change to wait")
            holder.rollback()
            holder.close()
            assert deletion.result(timeout=30).status_code == 204
            resp = answer.result(timeout=30)
        assert resp.status_code == (200 if change == "rename" else 204), resp.text
        events = events_of(database.engine, user.user_id)[before:]
        assert [(e["action"], int(e["entity_id"])) for e in events] == [
            ("task.deleted", gone["id"]),
            ("task.updated", kept["id"]),
        ]
        assert events[0]["before"]["tags"] == ["shared"]
        assert events[1]["after"]["tags"] == (["S"] if change == "rename" else [])
        assert http.get(user.url(f"/{kept['id']}")).json()["tags"] == events[1]["after"]["tags"]


def test_a_rename_that_waited_for_the_same_rename_changes_nothing(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """Two identical renames at once: the second waits for the tag's lock, then finds the
    name already given and, like a rename to the current name, records nothing (it recorded
    an empty `task.updated` per task and moved their versions, so ETags went stale)."""
    with live_server.client(headers=user.headers) as http:
        task = create(http, user, "Tagged", tags=["old"])
        tag = list_tags(http, user)[0]  # type: ignore[arg-type]
        before = len(events_of(database.engine, user.user_id))
        with ThreadPoolExecutor(1) as pool, database.unit_of_work() as session:
            rules.rename_tag(
                session, AuditContext(actor_id=user.user_id), user.user_id, tag["id"], "new"
            )
            second = pool.submit(http.patch, tags_url(user, f"/{tag['id']}"), json={"name": "new"})
            wait_until(lambda: lock_waits(database.engine) == 1, "the second rename to wait")
        resp = second.result(timeout=30)
        assert resp.status_code == 200 and resp.json()["name"] == "new", resp.text
        events = events_of(database.engine, user.user_id)[before:]
        assert [(e["action"], e["changes"]) for e in events] == [
            ("task.updated", {"tags": [["old"], ["new"]]})
        ]
        got = http.get(user.url(f"/{task['id']}"))
        assert got.headers["ETag"] == f'"{task["id"]}-2"', got.headers


def test_tag_renames_racing_task_tag_updates_all_succeed(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """Renames of two tags and updates moving them between four tasks, from eight threads:
    the updates lock their tags before the task, as the renames do, so none deadlocks (a
    deadlock was a 503 after a second's wait) and every task's last event is its state."""
    with live_server.client(headers=user.headers) as http:
        tasks = [create(http, user, f"t{i}", tags=["x", "y"])["id"] for i in range(4)]
        tag_ids = [tag["id"] for tag in list_tags(http, user)]  # type: ignore[arg-type]

    def one(index: int) -> tuple[str, int, str]:
        with live_server.client(headers=user.headers) as http:
            if index % 3 == 0:
                tag_id = tag_ids[index // 3 % 2]
                resp = http.patch(tags_url(user, f"/{tag_id}"), json={"name": f"n{tag_id}-{index}"})
                return "rename", resp.status_code, resp.text
            names = [tag["name"] for tag in http.get(tags_url(user)).json() if tag["id"] in tag_ids]
            subset = names[: index % 3] if index % 2 else names[index % 3 :]
            resp = http.put(user.url(f"/{tasks[index % 4]}"), json={"tags": subset})
            return "update", resp.status_code, resp.text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(240)))
    assert [r for r in results if r[1] != 200] == []
    events = events_of(database.engine, user.user_id)
    with live_server.client(headers=user.headers) as http:
        for task_id in tasks:
            last = [e for e in events if int(e["entity_id"]) == task_id][-1]
            assert http.get(user.url(f"/{task_id}")).json()["tags"] == last["after"]["tags"]


def test_creates_completions_and_tag_changes_of_one_user_at_once_never_collide(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """Twelve threads mixing creates with tags (each with its Idempotency-Key), completions
    of recurring tasks, tag renames, updates of a task's tags and tag deletions, for one user.
    Every write that uses tags holds the user's tag lock (shared) before any tag or task, and a
    rename or deletion holds it alone before its tag: none is rolled back. Before, a create
    waited for that lock holding a tag a rename had locked before asking for it, and a
    completion held its task while a rename held the tag: 503s, creates among them."""
    pool_names = ["p", "q", "r", "s"]
    with live_server.client(headers=user.headers) as http:
        recurring = [
            create(
                http,
                user,
                f"r{i}",
                tags=["p", "q"],
                due_at="2027-01-01T00:00:00Z",
                recurrence="FREQ=DAILY",
            )["id"]
            for i in range(6)
        ]
    plain: list[int] = []

    def one(index: int) -> tuple[str, int, str]:
        pick = random.Random(index)
        with live_server.client(headers=user.headers) as http:
            kind = index % 6
            if kind in (0, 1):
                names = pick.sample([*pool_names, f"u{pick.randrange(12)}"], 3)
                resp = http.post(
                    user.url(),
                    json={"title": f"n{index}", "tags": names},
                    headers={"Idempotency-Key": f"k{index}"},
                )
                if resp.status_code == 201:
                    plain.append(resp.json()["id"])
                return "create", resp.status_code, resp.text
            if kind == 2:
                task_id = pick.choice(recurring)
                resp = http.patch(user.url(f"/{task_id}/complete"), json={"completed": True})
                if resp.status_code == 200 and resp.json()["next_task_id"] is not None:
                    recurring.append(resp.json()["next_task_id"])
                return "complete", resp.status_code, resp.text
            if kind == 3 and plain:
                names = pick.sample([*pool_names, f"u{pick.randrange(12)}"], 2)
                resp = http.put(user.url(f"/{pick.choice(plain)}"), json={"tags": names})
                return "update", resp.status_code, resp.text
            tags = http.get(tags_url(user)).json()
            if not tags:  # all deleted: the next create makes some
                return "rename", 404, "no tags"
            tag = pick.choice(tags)
            if kind == 5 and index % 4 == 1:
                resp = http.delete(tags_url(user, f"/{tag['id']}"))
                return "delete", resp.status_code, resp.text
            resp = http.patch(tags_url(user, f"/{tag['id']}"), json={"name": f"z{index}"})
            return "rename", resp.status_code, resp.text

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(360)))
    allowed = {
        "create": {201},
        "complete": {200},
        "update": {200},
        # The tag was deleted after the list was read.
        "rename": {200, 404},
        "delete": {204, 404},
    }
    failed = [result for result in results if result[1] not in allowed[result[0]]]
    assert not failed, (Counter(result[:2] for result in failed), failed[0][2])
    events = events_of(database.engine, user.user_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    with live_server.client(headers=user.headers) as http:
        assert http.get(f"/api/{user.user_id}/audit-events/verify").json()["ok"] is True
        for task in http.get(user.url(), params={"limit": 500}).json():
            last = [e for e in events if int(e["entity_id"]) == task["id"]][-1]
            assert task["tags"] == last["after"]["tags"], task


def test_a_create_and_a_rename_of_a_tag_it_finds_after_its_turn_both_succeed(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """A create waits for its turn to create a tag; meanwhile 'x' is made, and a rename of 'x'
    locks it. The create's turn comes and it finds 'x': it waited for the rename's row lock
    while the rename waited for the creators' turn it held, and PostgreSQL rolled one of the
    two back (a 503: here the rename, under load often the create). Now both take the user's
    tag lock before any tag, the rename alone: it waits for the creates, and all succeed."""
    with live_server.client(headers=user.headers) as http:
        create(http, user, "first")  # the chain head exists
        head = locked(
            database.engine,
            "SELECT 1 FROM audit_chain_heads WHERE user_id = :u FOR UPDATE",
            {"u": user.user_id},
        )
        with ThreadPoolExecutor(3) as pool:
            # It takes its turn, inserts 'n0' and waits for the chain head, holding the turn.
            first = pool.submit(http.post, user.url(), json={"title": "a", "tags": ["n0"]})
            wait_until(lambda: lock_waits(database.engine) == 1, "the first create to wait")
            second = pool.submit(http.post, user.url(), json={"title": "b", "tags": ["x"]})
            wait_until(lambda: lock_waits(database.engine) == 2, "the second create to wait")
            with database.engine.begin() as conn:
                tag_id = conn.execute(
                    sa.text(
                        "INSERT INTO tags (user_id, name, created_at) "
                        "VALUES (:u, 'x', now()) RETURNING id"
                    ),
                    {"u": user.user_id},
                ).scalar_one()
            rename = pool.submit(http.patch, tags_url(user, f"/{tag_id}"), json={"name": "y"})
            wait_until(lambda: lock_waits(database.engine) == 3, "the rename to wait")
            head.rollback()
            head.close()
            answers = [f.result(timeout=30) for f in (first, second, rename)]
        assert [a.status_code for a in answers] == [201, 201, 200], answers[2].text
        assert answers[1].json()["tags"] == ["x"]  # it found the tag, then it was renamed
        assert http.get(user.url(f"/{answers[1].json()['id']}")).json()["tags"] == ["y"]
        assert answers[2].json()["task_count"] == 1


def test_a_completion_and_a_rename_of_its_tag_both_succeed(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """Completing a recurring task tags its next occurrence while holding the task; a rename
    of that tag locks the tag, then the task. The completion took the tag after the task, and
    PostgreSQL rolled one of the two back (a 503); now it holds the user's tag lock (shared)
    before the task, the rename waits for it before the tag, and both succeed in turn."""
    with live_server.client(headers=user.headers) as http:
        task = create(
            http,
            user,
            "daily",
            tags=["home"],
            due_at="2027-01-04T09:00:00Z",
            recurrence="FREQ=DAILY",
        )
        tag = list_tags(http, user)[0]  # type: ignore[arg-type]
        holder = locked(database.engine, TASK_ROW_LOCK, {"id": task["id"]})
        with ThreadPoolExecutor(2) as pool:
            completion = pool.submit(
                http.patch, user.url(f"/{task['id']}/complete"), json={"completed": True}
            )
            wait_until(lambda: lock_waits(database.engine) == 1, "the completion to wait")
            rename = pool.submit(http.patch, tags_url(user, f"/{tag['id']}"), json={"name": "Home"})
            wait_until(lambda: lock_waits(database.engine) == 2, "the rename to wait")
            holder.rollback()
            holder.close()
            completed, renamed = completion.result(timeout=30), rename.result(timeout=30)
        assert (completed.status_code, renamed.status_code) == (200, 200), renamed.text
        # The completion went first: the rename found the next occurrence and renamed it too.
        assert renamed.json()["task_count"] == 2
        series = [t for t in http.get(user.url()).json() if t["title"] == "daily"]
        assert len(series) == 2
        assert all(t["tags"] == ["Home"] for t in series)
        events = events_of(database.engine, user.user_id)
        for task_id in (t["id"] for t in series):
            last = [e for e in events if int(e["entity_id"]) == task_id][-1]
            assert last["after"]["tags"] == ["Home"]


def test_a_collision_postgresql_settles_by_rolling_back_is_a_503_to_retry(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """A rename holds its tag and waits for a task that another transaction holds, which then
    asks for the tag: PostgreSQL rolls the rename back (the other one waits longer before it
    looks for a deadlock). 503 with `Retry-After` (not 'database unavailable'), and the retry
    succeeds."""
    with live_server.client(headers=user.headers) as http:
        task = create(http, user, "t", tags=["home"])
        tag = list_tags(http, user)[0]  # type: ignore[arg-type]
        holder = locked(database.engine, TASK_ROW_LOCK, {"id": task["id"]})
        holder.execute(sa.text("SET LOCAL deadlock_timeout = '1min'"))
        url = tags_url(user, f"/{tag['id']}")
        with ThreadPoolExecutor(1) as pool:
            rename = pool.submit(http.patch, url, json={"name": "Home"})
            wait_until(lambda: lock_waits(database.engine) == 1, "the rename to wait")
            holder.execute(sa.text("SELECT 1 FROM tags WHERE id = :id FOR KEY SHARE"), tag)
            holder.rollback()
            holder.close()
            failed = rename.result(timeout=30)
        problem = assert_problem(failed, 503)
        assert "rolled back; retry it" in problem["detail"]
        assert failed.headers["Retry-After"] == "1"
        assert http.get(user.url(f"/{task['id']}")).json()["tags"] == ["home"]
        assert http.patch(url, json={"name": "Home"}).status_code == 200
        assert http.get(user.url(f"/{task['id']}")).json()["tags"] == ["Home"]


def _seed_tags(database: Database, user: ApiUser, count: int) -> None:
    with database.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO tags (user_id, name, created_at) "
                "SELECT :u, 'seed ' || g, now() FROM generate_series(1, :n) AS g"
            ),
            {"u": user.user_id, "n": count},
        )


def _tag_count(database: Database, user: ApiUser) -> int:
    with database.engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM tags WHERE user_id = :u")
        return int(conn.execute(query, {"u": user.user_id}).scalar_one())


def test_a_user_has_at_most_the_maximum_number_of_tags(
    database: Database, client: TestClient, user: ApiUser
) -> None:
    assert client.get(tags_url(user), headers=user.headers).status_code == 200  # the user exists
    _seed_tags(database, user, TAGS_PER_USER_MAX - 1)
    made = client.post(tags_url(user), json={"name": "last"}, headers=user.headers)
    assert made.status_code == 201, made.text
    for attempt in (
        client.post(tags_url(user), json={"name": "one more"}, headers=user.headers),
        client.post(user.url(), json={"title": "t", "tags": ["another"]}, headers=user.headers),
    ):
        problem = assert_problem(attempt, 409)
        assert problem["type"].endswith("/tag-conflict")
    # Existing names are still used.
    create(client, user, "t", tags=["LAST", "seed 7"])
    assert _tag_count(database, user) == TAGS_PER_USER_MAX


def test_concurrent_creates_never_exceed_the_maximum_number_of_tags(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """Each request counted the tags, then inserted: thirty at once, five short of the
    maximum, left it seven over."""
    with live_server.client(headers=user.headers) as http:
        assert http.get(tags_url(user)).status_code == 200
    _seed_tags(database, user, TAGS_PER_USER_MAX - 5)

    def one(index: int) -> int:
        with live_server.client(headers=user.headers) as http:
            if index % 2:
                body = {"title": "t", "tags": [f"task {index} {k}" for k in range(3)]}
                return http.post(user.url(), json=body).status_code
            return http.post(tags_url(user), json={"name": f"race {index}"}).status_code

    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(one, range(30)))
    assert set(statuses) <= {201, 409}
    assert 201 in statuses
    assert _tag_count(database, user) <= TAGS_PER_USER_MAX


def test_a_rename_into_a_taken_name_is_409_before_it_waits_for_anything(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """The clash is read without a lock, first: a rename into a name that another tag being
    deleted holds answered 409, and the delete 503 (the two deadlocked)."""
    with live_server.client(headers=user.headers) as http:
        task = create(http, user, "t", tags=["a", "b"])
        tags = {t["name"]: t["id"] for t in list_tags(http, user)}  # type: ignore[arg-type]
        holder = locked(database.engine, TASK_ROW_LOCK, {"id": task["id"]})
        with ThreadPoolExecutor(1) as pool:
            clash = http.patch(tags_url(user, f"/{tags['a']}"), json={"name": "B"})
            assert_problem(clash, 409)  # while the task is still locked: it waited for nothing
            deletion = pool.submit(http.delete, tags_url(user, f"/{tags['b']}"))
            wait_until(lambda: lock_waits(database.engine) == 1, "the delete to wait")
            holder.rollback()
            holder.close()
            assert deletion.result(timeout=30).status_code == 204
        assert http.get(user.url(f"/{task['id']}")).json()["tags"] == ["a"]


def test_a_rename_and_an_update_creating_that_name_both_succeed(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """The update creating 'zed' waited for the task that the rename into 'zed' held, and the
    rename for the update's uncommitted 'zed': one of them was a 503. Creators of a name
    take turns, so the update finds the renamed tag and uses it."""
    with live_server.client(headers=user.headers) as http:
        task = create(http, user, "t", tags=["a", "b"])
        tags = {t["name"]: t["id"] for t in list_tags(http, user)}  # type: ignore[arg-type]
        holder = locked(database.engine, TASK_ROW_LOCK, {"id": task["id"]})
        with ThreadPoolExecutor(2) as pool:
            rename = pool.submit(http.patch, tags_url(user, f"/{tags['a']}"), json={"name": "zed"})
            wait_until(lambda: lock_waits(database.engine) == 1, "the rename to wait")
            update = pool.submit(http.put, user.url(f"/{task['id']}"), json={"tags": ["zed"]})
            wait_until(lambda: lock_waits(database.engine) == 2, "the update to wait")
            holder.rollback()
            holder.close()
            renamed, updated = rename.result(timeout=30), update.result(timeout=30)
        assert (renamed.status_code, updated.status_code) == (200, 200), updated.text
        assert updated.json()["tags"] == ["zed"]
        assert {t["name"]: t["id"] for t in list_tags(http, user)} == {  # type: ignore[arg-type]
            "b": tags["b"],
            "zed": tags["a"],
        }


def test_at_the_tag_limit_a_missing_task_is_404_and_a_stale_etag_412(
    database: Database, client: TestClient, user: ApiUser
) -> None:
    """The task is checked before the tags are resolved: new tags past the limit do not hide
    what is wrong with the request itself."""
    task = create(client, user, "t")
    _seed_tags(database, user, TAGS_PER_USER_MAX - 1)
    new_tags = {"tags": ["new 1", "new 2", "new 3"]}
    assert_problem(client.put(user.url("/999999"), json=new_tags, headers=user.headers), 404)
    stale = {**user.headers, "If-Match": '"0-0"'}
    assert_problem(client.put(user.url(f"/{task['id']}"), json=new_tags, headers=stale), 412)
    over = client.put(user.url(f"/{task['id']}"), json=new_tags, headers=user.headers)
    assert assert_problem(over, 409)["type"].endswith("/tag-conflict")


def test_concurrent_creates_of_one_name_at_the_limit_all_get_the_tag(
    database: Database, live_server: LiveServer, user: ApiUser
) -> None:
    """One short of the limit: the first creates it (201), the others find it (200). Each
    counted the one created before it as missing too, and answered 409."""
    with live_server.client(headers=user.headers) as http:
        assert http.get(tags_url(user)).status_code == 200
    _seed_tags(database, user, TAGS_PER_USER_MAX - 1)

    def one(_: int) -> int:
        with live_server.client(headers=user.headers) as http:
            return http.post(tags_url(user), json={"name": "same"}).status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = sorted(pool.map(one, range(6)))
    assert statuses == [200, 200, 200, 200, 200, 201]
    assert _tag_count(database, user) == TAGS_PER_USER_MAX
