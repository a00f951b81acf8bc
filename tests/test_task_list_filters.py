"""Filters and sorts of `GET /api/{user_id}/tasks` over HTTP, alone and combined, page by page
(X-Total-Count and Link on every combination), checked against the same rules applied in
Python to what the API returned for each task."""

from __future__ import annotations

import base64
import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.support import ApiUser, assert_validation_error, link_url
from tests.support import create_task as create

RANK = {"none": 0, "low": 1, "medium": 2, "high": 3}
NOW = datetime.now(UTC)


def iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seed(client: TestClient, user: ApiUser) -> list[dict[str, Any]]:
    """Twelve tasks covering every priority, due dates past/future/none, tags, completion,
    and equal sort keys (ties), created in this order."""
    specs: list[dict[str, Any]] = [
        {"title": "alpha report", "priority": "high", "due": -2, "tags": ["work"], "done": False},
        {"title": "Bravo", "priority": "low", "due": 3, "tags": ["home"], "done": False},
        {"title": "charlie", "priority": "none", "due": None, "tags": [], "done": False},
        {"title": "delta report", "priority": "medium", "due": -1, "tags": ["work", "urgent"],
         "done": True},
        {"title": "Echo", "priority": "high", "due": 3, "tags": ["Work", "home"], "done": False},
        {"title": "foxtrot", "priority": "low", "due": None, "tags": ["urgent"], "done": True},
        {"title": "golf", "priority": "medium", "due": -5, "tags": ["urgent", "work"],
         "done": False},
        {"title": "Bravo", "priority": "none", "due": 10, "tags": [], "done": False},
        {"title": "hotel 100%", "priority": "high", "due": None, "tags": ["home"], "done": False},
        {"title": "india", "priority": "none", "due": -3, "tags": ["work"], "done": False},
        {"title": "juliet_x", "priority": "medium", "due": 3, "tags": [], "done": True},
        {"title": "kilo", "priority": "low", "due": 1, "tags": ["work", "home", "urgent"],
         "done": False},
    ]  # fmt: skip
    base = NOW.replace(microsecond=0)
    tasks = []
    for spec in specs:
        body: dict[str, Any] = {"priority": spec["priority"], "tags": spec["tags"]}
        if spec["due"] is not None:
            body["due_at"] = iso(base + timedelta(days=spec["due"]))
        task = create(client, user, spec["title"], **body)
        if spec["done"]:
            resp = client.patch(user.url(f"/{task['id']}/complete"), headers=user.headers)
            task = resp.json()
        tasks.append(task)
    # Updated in another order than created, so the two sorts differ.
    for task in tasks[::3]:
        resp = client.put(
            user.url(f"/{task['id']}"), json={"description": "touched"}, headers=user.headers
        )
        tasks[tasks.index(task)] = resp.json()
    return tasks


@pytest.fixture(scope="module")
def seeded(app_module: Any) -> tuple[ApiUser, list[dict[str, Any]], TestClient]:
    client, user = app_module
    return user, seed(client, user), client


@pytest.fixture(scope="module")
def app_module(request: pytest.FixtureRequest) -> Any:
    """One user and their tasks for the whole module (the reads do not change them)."""
    from service.app import create_app

    settings = request.getfixturevalue("base_settings")
    database = request.getfixturevalue("database")
    from service.auth import create_dev_token
    from tests.jwt_helpers import random_id

    user_id = random_id()
    token = create_dev_token(
        settings.better_auth_secret.get_secret_value(), user_id, email=None, name=None
    )
    with TestClient(create_app(settings, database), raise_server_exceptions=False) as client:
        yield client, ApiUser(user_id, token)


def parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def expected(
    tasks: list[dict[str, Any]], params: dict[str, Any], now: datetime
) -> list[dict[str, Any]]:
    """The documented rules, in Python."""
    out = list(tasks)
    status = params.get("status", "all")
    if status == "pending":
        out = [t for t in out if not t["completed"]]
    elif status == "completed":
        out = [t for t in out if t["completed"]]
    if "priority" in params:
        out = [t for t in out if t["priority"] in params["priority"]]
    if "tag" in params:
        wanted = {name.lower() for name in params["tag"]}
        out = [t for t in out if wanted <= {name.lower() for name in t["tags"]}]
    if "due_before" in params:
        limit = parse_time(params["due_before"])
        out = [t for t in out if t["due_at"] and parse_time(t["due_at"]) < limit]  # type: ignore[operator]
    if "due_after" in params:
        limit = parse_time(params["due_after"])
        out = [t for t in out if t["due_at"] and parse_time(t["due_at"]) > limit]  # type: ignore[operator]
    if params.get("overdue") == "true":
        out = [
            t for t in out if t["due_at"] and parse_time(t["due_at"]) < now and not t["completed"]
        ]
    if "q" in params:
        needle = params["q"].lower()
        out = [
            t
            for t in out
            if needle in t["title"].lower() or needle in (t["description"] or "").lower()
        ]
    sort = params.get("sort", "created_at")
    desc = params.get("order", "desc") == "desc"

    def key(task: dict[str, Any]) -> Any:
        value = task[sort]
        if sort == "priority":
            value = RANK[value]
        elif sort == "title":  # as people read titles: case aside, then as written
            value = (value.lower(), value)
        elif sort in ("created_at", "updated_at", "due_at") and value is not None:
            value = parse_time(value)
        return value

    with_value = [t for t in out if key(t) is not None]
    without = [t for t in out if key(t) is None]
    with_value.sort(key=lambda t: (key(t), t["id"]), reverse=desc)
    without.sort(key=lambda t: t["id"], reverse=desc)
    return with_value + without  # no due date: last in both orders


def fetch_all_pages(
    client: TestClient, user: ApiUser, params: dict[str, Any], limit: int
) -> tuple[list[dict[str, Any]], set[int]]:
    """Follow `Link: rel="next"` from the first page; every page's X-Total-Count."""
    items: list[dict[str, Any]] = []
    totals: set[int] = set()
    query: Any = [*_flatten(params), ("limit", limit)]
    url = user.url()
    for _ in range(50):
        resp = client.get(url, params=query, headers=user.headers)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page) <= limit
        items.extend(page)
        totals.add(int(resp.headers["X-Total-Count"]))
        link = resp.headers.get("Link")
        if link is None:
            return items, totals
        assert link.endswith('; rel="next"')
        target = urlsplit(link[1 : link.index(">")])
        url, query = target.path, parse_qsl(target.query)
    raise AssertionError("too many pages")


def _flatten(params: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for name, value in params.items():
        for one in value if isinstance(value, list) else [value]:
            pairs.append((name, one))
    return pairs


SORTS = ["created_at", "updated_at", "title", "due_at", "priority"]
FILTERS: list[dict[str, Any]] = [
    {},
    {"status": "pending"},
    {"status": "completed"},
    {"priority": ["high"]},
    {"priority": ["low", "medium"]},
    {"tag": ["work"]},
    {"tag": ["WORK", "urgent"]},
    {"tag": ["work", "home", "urgent"]},
    {"tag": ["no-such-tag"]},
    {"due_before": iso(NOW)},
    {"due_after": iso(NOW)},
    {"due_after": iso(NOW - timedelta(days=4)), "due_before": iso(NOW + timedelta(days=2))},
    {"overdue": "true"},
    {"q": "report"},
    {"q": "%"},
    {"q": "_"},
    {"status": "pending", "priority": ["high", "medium"], "tag": ["work"]},
    {"overdue": "true", "tag": ["work"], "priority": ["high", "none"]},
    {"q": "o", "status": "pending", "due_after": iso(NOW - timedelta(days=30))},
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f) or "none")
def test_each_filter_with_every_sort_and_order_page_by_page(
    seeded: tuple[ApiUser, list[dict[str, Any]], TestClient], filters: dict[str, Any]
) -> None:
    user, tasks, client = seeded
    current = [client.get(user.url(f"/{t['id']}"), headers=user.headers).json() for t in tasks]
    for sort, order in itertools.product(SORTS, ["asc", "desc"]):
        params = {**filters, "sort": sort, "order": order}
        want = expected(current, params, datetime.now(UTC))
        got, totals = fetch_all_pages(client, user, params, limit=3)
        assert [t["id"] for t in got] == [t["id"] for t in want], params
        assert totals == {len(want)} or (not want and totals == {0}), params


def test_priority_sorts_by_rank_not_alphabet(
    seeded: tuple[ApiUser, list[dict[str, Any]], TestClient],
) -> None:
    user, _, client = seeded
    ranks = [
        RANK[t["priority"]]
        for t in client.get(
            user.url(), params={"sort": "priority", "order": "desc"}, headers=user.headers
        ).json()
    ]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] == 3 and ranks[-1] == 0


def test_tasks_without_due_date_come_last_in_both_orders(
    seeded: tuple[ApiUser, list[dict[str, Any]], TestClient],
) -> None:
    user, _, client = seeded
    for order in ("asc", "desc"):
        page = client.get(
            user.url(), params={"sort": "due_at", "order": order}, headers=user.headers
        ).json()
        dues = [t["due_at"] for t in page]
        assert dues[-3:] == [None, None, None] and None not in dues[:-3]


def test_filter_by_tag_is_per_user(
    seeded: tuple[ApiUser, list[dict[str, Any]], TestClient], make_user: Any
) -> None:
    user, _, client = seeded
    other = make_user()
    create(client, other, "Other's work", tags=["work"])
    mine = client.get(user.url(), params={"tag": "work"}, headers=user.headers).json()
    theirs = client.get(other.url(), params={"tag": "work"}, headers=other.headers).json()
    assert [t["title"] for t in theirs] == ["Other's work"]
    assert "Other's work" not in [t["title"] for t in mine]


def test_filter_by_tag_matches_as_postgresql_lower_cases(client: TestClient, user: ApiUser) -> None:
    """The filter finds a tag by PostgreSQL's lower(), as the tag was stored: Python's
    lower-cases 'ΟΔΟΣ' differently ('οδος'), and a name PostgreSQL folds onto another
    given twice is one tag, not two that no task carries together."""
    road = create(client, user, "road", tags=["ΟΔΟΣ"])
    both = create(client, user, "both", tags=["ΟΔΟΣ", "İstanbul"])
    create(client, user, "neither", tags=["x"])

    def titles(tags: list[str]) -> list[str]:
        resp = client.get(user.url(), params={"tag": tags}, headers=user.headers)
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Total-Count"] == str(len(resp.json()))
        return [t["title"] for t in resp.json()]

    assert titles(["ΟΔΟΣ"]) == [both["title"], road["title"]]
    assert titles(["οδοσ"]) == [both["title"], road["title"]]
    assert titles(["ΟΔΟΣ", "οδοσ"]) == [both["title"], road["title"]]
    assert titles(["İstanbul"]) == [both["title"]]
    assert titles(["ΟΔΟΣ", "İSTANBUL"]) == [both["title"]]
    assert titles(["ΟΔΟΣ", "nope"]) == []


def test_search_finds_greek_and_german_words_typed_in_capitals(
    client: TestClient, user: ApiUser
) -> None:
    """lower() maps a capital sigma to the medial one, never to the final one, and leaves 'ß',
    whose capitals are SS: both sides of `q` fold them too."""
    odysseus = create(client, user, "Call Οδυσσέας", description="Σίσυφος")
    street = create(client, user, "Straße fegen")
    create(client, user, "something else")

    def found(text: str) -> list[int]:
        resp = client.get(user.url(), params={"q": text}, headers=user.headers)
        assert resp.status_code == 200, resp.text
        return [task["id"] for task in resp.json()]

    for text in ("οδυσσέας", "ΟΔΥΣΣΈΑΣ", "Οδυσσέασ", "ΣΊΣΥΦΟΣ", "σίσυφος"):
        assert found(text) == [odysseus["id"]], text
    for text in ("straße", "STRASSE", "strasse", "STRAẞE"):
        assert found(text) == [street["id"]], text


def test_titles_sort_case_aside(client: TestClient, user: ApiUser) -> None:
    """Not byte order (every capital before every small letter under the C collations)."""
    for title in ("banana", "Zucchini", "apple", "Cherry", "cherry", "Apple"):
        create(client, user, title)
    for order, want in (
        ("asc", ["Apple", "apple", "banana", "Cherry", "cherry", "Zucchini"]),
        ("desc", ["Zucchini", "cherry", "Cherry", "banana", "apple", "Apple"]),
    ):
        resp = client.get(
            user.url(), params={"sort": "title", "order": order}, headers=user.headers
        )
        assert [t["title"] for t in resp.json()] == want


def _walk(client: TestClient, user: ApiUser, url: str, between: Any) -> list[int]:
    """Every id a client paging by the links sees, `between(page)` run after each page."""
    seen: list[int] = []
    while url:
        resp = client.get(url, headers=user.headers)
        assert resp.status_code == 200, resp.text
        seen += [task["id"] for task in resp.json()]
        between(resp.json())
        url = link_url(resp, "next") or ""
    return seen


@pytest.mark.parametrize("change", ["complete", "delete", "create"])
@pytest.mark.parametrize("sort", ["created_at", "title", "due_at"])
def test_paging_skips_and_repeats_nothing_while_tasks_change(
    client: TestClient, user: ApiUser, change: str, sort: str
) -> None:
    """A client pages its open tasks and, after each page, completes or deletes the page's
    first task or adds one: every task that was open throughout is seen exactly once."""
    due = [NOW + timedelta(days=n % 3) if n % 4 else None for n in range(14)]
    tasks = [create(client, user, f"t{n % 5}", due_at=due[n] and iso(due[n])) for n in range(14)]

    def between(page: list[dict[str, Any]]) -> None:
        first = page[0]["id"]
        if change == "complete":
            client.patch(user.url(f"/{first}/complete"), headers=user.headers)
        elif change == "delete":
            client.delete(user.url(f"/{first}"), headers=user.headers)
        else:
            create(client, user, "t0", due_at=iso(NOW))

    url = user.url(f"?status=pending&sort={sort}&order=asc&limit=3")
    seen = _walk(client, user, url, between)
    assert len(seen) == len(set(seen)), seen
    assert {task["id"] for task in tasks} <= set(seen)


def _cursor(*values: Any) -> str:
    """A cursor as the service writes one (base64url JSON), with any values."""
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "params",
    [
        {"after": "not-a-cursor"},
        {"after": _cursor()},
        {"after": _cursor("reminders", "2026-01-01T00:00:00+00:00", 1)},  # another list's
        {"after": _cursor("tasks", "title", "asc", "a", 1)},  # asked by created_at desc
        {"after": _cursor("tasks", "created_at", "desc", "noon", 1)},
        {"after": _cursor("tasks", "created_at", "desc", "2026-01-01T00:00:00", 1)},  # no zone
        {"after": _cursor("tasks", "created_at", "desc", None, 1)},  # only due_at has nulls
        {"after": _cursor("tasks", "created_at", "desc", "2026-01-01T00:00:00Z", 0)},
        {"after": _cursor("tasks", "created_at", "desc", "2026-01-01T00:00:00Z", "1")},
        {"after": "x" * 2049},
        # JSON nested past Python's recursion limit, within the cursor's length.
        {"after": base64.urlsafe_b64encode(b"[" * 1500).decode().rstrip("=")},
        # Edited by hand: text no title holds, a time past year 9999 once in UTC.
        {"sort": "title", "order": "asc", "after": _cursor("tasks", "title", "asc", "a\x00", 1)},
        {"sort": "title", "order": "asc", "after": _cursor("tasks", "title", "asc", "\ud800", 1)},
        {"after": _cursor("tasks", "created_at", "desc", "9999-12-31T23:59:59-23:59", 1)},
        {
            "sort": "due_at",
            "order": "asc",
            "after": _cursor("tasks", "due_at", "asc", "0001-01-01T00:00+01:00", 1),
        },
    ],
)
def test_a_bad_after_is_400(client: TestClient, user: ApiUser, params: dict[str, Any]) -> None:
    assert_validation_error(
        client.get(user.url(), params=params, headers=user.headers), "query.after"
    )


def test_the_longest_titles_page_by_title(client: TestClient, user: ApiUser) -> None:
    """The cursor holds the last title: 200 characters of four UTF-8 bytes each still fit."""
    titles = [emoji * 200 for emoji in ("\U0001f600", "\U0001f601", "\U0001f602")]
    for title in titles:
        create(client, user, title)
    seen: list[str] = []
    url: str | None = user.url("?sort=title&order=asc&limit=1")
    while url:
        resp = client.get(url, headers=user.headers)
        assert resp.status_code == 200, resp.text
        seen += [task["title"] for task in resp.json()]
        url = link_url(resp, "next")
    assert seen == titles


def test_after_and_offset_together_are_400(client: TestClient, user: ApiUser) -> None:
    for n in range(3):
        create(client, user, f"t{n}")
    link = link_url(client.get(user.url("?limit=1"), headers=user.headers), "next")
    assert link is not None
    assert client.get(link, headers=user.headers).status_code == 200
    resp = client.get(link + "&offset=1", headers=user.headers)
    assert_validation_error(resp, "query.after")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"priority": "urgent"}, "query.priority.0"),
        ({"due_before": "2026-01-01T00:00:00"}, "query.due_before"),
        ({"due_after": "yesterday"}, "query.due_after"),
        ({"overdue": "perhaps"}, "query.overdue"),
        ({"sort": "tags"}, "query.sort"),
        ({"tag": "x" * 51}, "query.tag.0"),
        ({"tag": " "}, "query.tag.0"),
        ({"tag": ["ok", "bad\x07bell"]}, "query.tag.1"),
        ({"tag": "x" * 201}, "query.tag.0"),
        ({"tag": [f"t{i}" for i in range(21)]}, "query.tag"),
    ],
)
def test_list_rejects_bad_filters(
    client: TestClient, user: ApiUser, params: dict[str, Any], field: str
) -> None:
    resp = client.get(user.url(), params=params, headers=user.headers)
    assert_validation_error(resp, field)


@pytest.fixture(scope="module")
def many_tasks_user(database: Any) -> str:
    """A user with 5,000 tasks as the benchmark seeds them (every priority, due dates from 20
    days past to 40 ahead, a third completed, their chain), the table analyzed: plans as at
    scale, not a dozen rows that any index (or none) serves alike."""
    from bench.seed import _seed_user
    from tests.jwt_helpers import random_id

    user_id = random_id()
    raw = database.engine.raw_connection()
    try:
        _seed_user(raw.dbapi_connection, user_id, 5_000)
    finally:
        raw.close()
    with database.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE tasks")
        conn.commit()
    return user_id


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({"status": "pending"}, "ix_tasks_user_pending"),
        ({"overdue": True}, "ix_tasks_user_pending"),
        ({"overdue": True, "priorities": ("high", "medium")}, "ix_tasks_user_pending"),
        # One priority of the open tasks: that priority's entries, then each row's status.
        ({"status": "pending", "priorities": ("high",)}, "ix_tasks_user_priority"),
    ],
)
def test_counts_of_open_tasks_are_read_from_an_index(
    many_tasks_user: str, database: Any, filters: dict[str, Any], index: str
) -> None:
    """X-Total-Count of the everyday views reads open tasks only (ix_tasks_user_pending, 0012:
    overdue ones by due date), not every task of the user (bench/explain.py reads the same
    plans at 100,000 tasks)."""
    from bench.explain import explain
    from service.priority import Priority
    from service.tasks.queries import SortField, SortOrder, StatusFilter, TaskFilter, list_query

    task_filter = TaskFilter(
        status=StatusFilter(filters.get("status", "all")),
        priorities=tuple(Priority(p) for p in filters.get("priorities", ())),
        overdue=filters.get("overdue", False),
    )
    with database.engine.connect() as conn:
        query = list_query(
            conn,
            many_tasks_user,
            task_filter,
            SortField.created_at,
            SortOrder.desc,
            limit=50,
            offset=0,
        )
        assert query is not None
        _, count, params = query
        # This user holds most of the test database's rows, where reading the whole table is
        # cheaper; among a production database's many users it is not. The choice among
        # indexes is what is tested.
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        indexes, seq_scan, _ = explain(conn, count, params)
        conn.rollback()
    assert not seq_scan
    assert indexes == [index]


def _rows_read_from_tasks(plan: dict[str, Any]) -> int:
    """Rows every scan of `tasks` in an EXPLAIN ANALYZE plan returned or filtered out."""
    read = 0
    if plan.get("Relation Name") == "tasks":
        read += plan["Actual Rows"] * plan["Actual Loops"] + plan.get("Rows Removed by Filter", 0)
    return read + sum(_rows_read_from_tasks(child) for child in plan.get("Plans", ()))


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_a_deep_page_by_due_date_reads_a_page_of_rows(
    many_tasks_user: str, database: Any, order: str
) -> None:
    """A page after a task with a due date reads the later due dates and the tasks without
    one as two index ranges, each a page long at most: not every task before the cursor, nor
    (beside another user's many tasks without a due date) the whole table by id."""
    from service.tasks.queries import After, SortField, SortOrder, TaskFilter, list_query

    limit = 50
    with database.engine.connect() as conn:
        # Rolled back below, statistics included: the audit triggers are off only for it.
        conn.exec_driver_sql("ALTER TABLE tasks DISABLE TRIGGER ALL")
        conn.exec_driver_sql(
            "INSERT INTO tasks (user_id, title, completed, created_at, updated_at, priority, "
            "version) SELECT 'undated-neighbour', 't', false, now(), now(), 'none', 1 "
            "FROM generate_series(1, 20000)"
        )
        conn.exec_driver_sql("ANALYZE tasks")
        deep = conn.execute(
            sa.text(
                f"SELECT due_at, id FROM tasks WHERE user_id = :u "
                f"ORDER BY due_at {order} NULLS LAST, id {order} OFFSET 4000 LIMIT 1"
            ),
            {"u": many_tasks_user},
        ).one()
        query = list_query(
            conn,
            many_tasks_user,
            TaskFilter(),
            SortField.due_at,
            SortOrder(order),
            limit=limit,
            offset=0,
            after=After(deep.due_at, deep.id),
        )
        assert query is not None
        compiled = query.page.params(**query.params).compile(
            dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
        )
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + compiled.string, compiled.params)
        plan = cursor.fetchone()[0][0]["Plan"]
        cursor.close()
        conn.rollback()
    assert _rows_read_from_tasks(plan) <= 2 * (limit + 1)


def test_due_bounds_finer_than_a_microsecond_compare_exactly(
    client: TestClient, user: ApiUser
) -> None:
    """Due times are kept to the microsecond; `due_before` was cut, so a task due at
    .420007 was not 'before .4200075'."""
    task = create(client, user, "Exact", due_at="2030-01-01T00:00:00.420007Z")

    def found(**params: str) -> bool:
        listed = client.get(user.url(), params=params, headers=user.headers)
        assert listed.status_code == 200, listed.text
        return [t["id"] for t in listed.json()] == [task["id"]]

    assert found(due_before="2030-01-01T01:00:00.4200075+01:00")
    assert not found(due_before="2030-01-01T00:00:00.4200070Z")
    assert found(due_after="2030-01-01T00:00:00.4200069Z")
    assert not found(due_after="2030-01-01T00:00:00.4200071Z")


def _fold(text: str) -> str:
    """What the documented `q` compares, in Python: lower case, a final sigma as the medial
    one, ß as ss (Python's lower() already gives a final sigma where PostgreSQL's does not)."""
    return text.lower().replace("\u03c2", "\u03c3").replace("ß", "ss")


def test_folded_search_with_other_filters_pages_as_computed(
    client: TestClient, user: ApiUser
) -> None:
    """`q` typed in capitals, with literal `%` `_` `\\`, combined with tags, status and
    priority, in every sort and order: the pages reached through `Link` hold exactly the tasks
    the documented rules select, each once and in order; every page's X-Total-Count is their
    number; HEAD of the first page answers GET's headers."""
    specs: list[tuple[str, str | None, str, list[str], int | None]] = [
        ("Straße fegen", None, "high", ["Haus"], 2),
        ("STRASSE sperren", "100% sicher", "low", ["haus", "Arbeit"], None),
        ("Call Οδυσσέας", "a_b", "none", ["Arbeit"], -1),
        ("odd 50%_off", "back\\slash", "medium", [], 1),
        ("Σίσυφος", "Straße", "high", ["HAUS"], None),
        ("plain", "nothing", "low", ["Arbeit"], -3),
    ]
    base = NOW.replace(microsecond=0)
    for number, (title, description, priority, tags, due) in enumerate(specs):
        body: dict[str, Any] = {"priority": priority, "tags": tags}
        if due is not None:
            body["due_at"] = iso(base + timedelta(days=due))
        task = create(client, user, title, description=description, **body)
        if number % 3 == 1:
            client.patch(user.url(f"/{task['id']}/complete"), headers=user.headers)
    tasks = client.get(user.url(), headers=user.headers).json()
    combos: list[dict[str, Any]] = [
        {"q": "STRASSE"},
        {"q": "strasse", "tag": ["HAUS"]},
        {"q": "ΟΔΥΣΣΈΑΣ", "status": "pending"},
        {"q": "σίσυφοσ", "priority": ["high", "low"]},
        {"q": "%", "tag": ["arbeit"]},
        {"q": "_"},
        {"q": "\\"},
        {"q": "S", "tag": ["haus", "ARBEIT"], "status": "completed"},
        {"q": "A", "overdue": "true"},
    ]
    found = set()
    for combo in combos:
        without_q = {name: value for name, value in combo.items() if name != "q"}
        for sort, order in itertools.product(SORTS, ["asc", "desc"]):
            params = {**without_q, "sort": sort, "order": order}
            needle = _fold(combo["q"])
            want = [
                t
                for t in expected(tasks, params, datetime.now(UTC))
                if needle in _fold(t["title"]) or needle in _fold(t["description"] or "")
            ]
            params["q"] = combo["q"]
            got, totals = fetch_all_pages(client, user, params, limit=2)
            assert [t["id"] for t in got] == [t["id"] for t in want], params
            assert totals == {len(want)}, params
            found.add(bool(want))
            query = [*_flatten(params), ("limit", 2)]
            get = client.get(user.url(), params=query, headers=user.headers)
            head = client.head(user.url(), params=query, headers=user.headers)
            assert head.status_code == 200 and head.content == b"", params
            for name in ("X-Total-Count", "Link"):
                assert head.headers.get(name) == get.headers.get(name), (name, params)
    assert found == {True}, "every combination selects some task"
