"""Errors through HTTP: always problem+json with the right 4xx/5xx, never a leak or a 500.

Also the unit of work: a commit that fails gives an error response and leaves nothing
behind, and every request (failing ones included) hands its connection back to the pool.
"""

from __future__ import annotations

import gzip
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_dev_token
from service.database import Database, build_engine
from service.errors import MAX_FIELD_ERRORS
from service.routing import every_route
from service.settings import Settings
from tests.feed_helpers import wait_listening
from tests.reliability_helpers import write_past_the_statement_timeout
from tests.support import (
    TEST_SECRET,
    ApiUser,
    LiveServer,
    MakeUser,
    assert_no_leak,
    assert_problem,
    assert_validation_error,
    create_task,
    free_port,
)

LIMIT = 64 * 1024

# Routing: 404 / 405 -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/nope", "/api", "/api/u1/tasks/1/extra", "/api/u1/things", "/api/u1/tasks/1/done"]
)
def test_unknown_routes_are_404_problem(client: TestClient, user: ApiUser, path: str) -> None:
    assert_problem(client.get(path, headers=user.headers), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "", "GET, HEAD, POST"),
        ("PUT", "", "GET, HEAD, POST"),
        ("PATCH", "", "GET, HEAD, POST"),
        ("POST", "/1", "DELETE, GET, HEAD, PUT"),
        ("PATCH", "/1", "DELETE, GET, HEAD, PUT"),
        ("OPTIONS", "/1", "DELETE, GET, HEAD, PUT"),
        ("GET", "/1/complete", "PATCH"),
        ("HEAD", "/1/complete", "PATCH"),
        ("POST", "/1/complete", "PATCH"),
    ],
)
def test_wrong_methods_are_405_problem_allowing_every_method_of_the_path(
    client: TestClient, user: ApiUser, method: str, path: str, allowed: str
) -> None:
    """`Allow` lists what the path answers (RFC 9110 15.5.6), not just the first route's
    methods: Starlette said `Allow: GET` on `/tasks/1`, though PUT and DELETE answer there."""
    resp = client.request(method, user.url(path), headers=user.headers)
    assert resp.headers["Allow"] == allowed
    if method == "HEAD":  # the problem without its body
        assert (resp.status_code, resp.content) == (405, b"")
        return
    problem = assert_problem(resp, 405)
    assert problem["detail"] == f"{method} is not allowed here; this path answers {allowed}."


def test_wrong_method_on_health_is_405(client: TestClient) -> None:
    resp = client.post("/healthz")
    assert_problem(resp, 405)
    assert resp.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_probes_answer_head_as_get_without_the_body(client: TestClient, path: str) -> None:
    """Uptime monitors often probe with HEAD."""
    wait_listening(client.app)  # /readyz reports the feed: "connecting" until then
    got, head = client.get(path), client.head(path)
    assert (got.status_code, head.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["Content-Type"] == got.headers["Content-Type"] == "application/json"
    assert head.headers["Content-Length"] == got.headers["Content-Length"]


def test_every_get_route_answers_head_as_get_but_the_feed_and_verify(
    app: FastAPI, client: TestClient, user: ApiUser, database: Database
) -> None:
    """RFC 9110 9.3.2: HEAD is GET without the body, on every route (the docs pages too),
    with the token checked the same way. The change feed never ends its body, so a HEAD
    there would hold a stream (and spend a ticket); verify records what it found, and HEAD
    must not write: both stay GET only."""
    task = create_task(client, user)
    values = {"user_id": user.user_id, "task_id": task["id"], "tag_id": 1}
    get_only = {"/api/{user_id}/events", "/api/{user_id}/audit-events/verify"}
    paths = {
        route.path
        for route in every_route(app.routes)
        if isinstance(route, APIRoute) and "GET" in route.methods
    }
    assert len(paths) >= 15 and get_only <= paths
    for path in sorted(paths - get_only):
        url = path.format(**values)
        for headers in (user.headers, {}):
            got, head = client.get(url, headers=headers), client.head(url, headers=headers)
            assert (head.status_code, head.content) == (got.status_code, b""), (path, headers)
            assert head.headers["Content-Type"] == got.headers["Content-Type"], path
    verify = "/api/{user_id}/audit-events/verify".format(**values)
    assert client.get(verify, headers=user.headers).json()["head_seq"] == 1
    create_task(client, user)  # seq 2, which no verify has seen
    for path in sorted(get_only):
        refused = client.head(path.format(**values), headers=user.headers)
        assert (refused.status_code, refused.headers["Allow"]) == (405, "GET"), path
    with database.engine.connect() as conn:
        verified = conn.execute(
            sa.text("SELECT seq FROM audit_verified_heads WHERE user_id = :u"),
            {"u": user.user_id},
        ).scalar()
    assert verified == 1  # where the GET left it: the HEAD recorded nothing


# Bodies: 413 / 415 --------------------------------------------------------------------


def _json_of_size(size: int) -> bytes:
    """A JSON object of exactly `size` bytes (a long title: valid JSON, invalid task)."""
    head, tail = b'{"title": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize(
    ("method", "path"), [("POST", ""), ("PUT", "/1"), ("PATCH", "/1/complete")]
)
def test_body_over_64_kib_is_413_with_content_length(
    client: TestClient, user: ApiUser, method: str, path: str
) -> None:
    body = _json_of_size(LIMIT + 1)
    headers = {**user.headers, "Content-Type": "application/json"}
    resp = client.request(method, user.url(path), content=body, headers=headers)
    assert_problem(resp, 413)


def test_body_of_exactly_64_kib_is_not_413(client: TestClient, user: ApiUser) -> None:
    headers = {**user.headers, "Content-Type": "application/json"}
    resp = client.post(user.url(), content=_json_of_size(LIMIT), headers=headers)
    assert_validation_error(resp, "body.title")  # read in full, then refused as a too-long title


def _chunks(total: int, size: int = 4096) -> Iterator[bytes]:
    body = _json_of_size(total)
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize(
    ("method", "path"), [("POST", ""), ("PUT", "/1"), ("PATCH", "/1/complete")]
)
def test_chunked_body_over_64_kib_is_413(
    client: TestClient, user: ApiUser, method: str, path: str
) -> None:
    """No Content-Length to trust: the body is counted as it arrives."""
    headers = {**user.headers, "Content-Type": "application/json"}
    resp = client.request(method, user.url(path), content=_chunks(LIMIT + 100), headers=headers)
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert_problem(resp, 413)


def test_chunked_body_over_64_kib_is_413_on_a_real_socket(
    live_server: LiveServer, user: ApiUser
) -> None:
    headers = {**user.headers, "Content-Type": "application/json"}
    with live_server.client() as http:
        resp = http.post(user.url(), content=_chunks(LIMIT * 4), headers=headers)
        assert resp.request.headers.get("transfer-encoding") == "chunked"
        assert_problem(resp, 413)
        small = http.post(user.url(), content=_chunks(200, size=50), headers=headers)
        assert small.status_code == 201  # a chunked body under the limit is fine


def test_invalid_content_length_is_400(client: TestClient, user: ApiUser) -> None:
    headers = {**user.headers, "Content-Type": "application/json", "Content-Length": "-5"}
    resp = client.post(user.url(), content=b"", headers=headers)
    assert_validation_error(resp, "header.content-length")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
@pytest.mark.parametrize(
    ("method", "path"), [("POST", ""), ("PUT", "/1"), ("PATCH", "/1/complete")]
)
def test_non_json_body_is_415(
    client: TestClient, user: ApiUser, content_type: str | None, method: str, path: str
) -> None:
    headers = dict(user.headers)
    if content_type is not None:
        headers["Content-Type"] = content_type
    resp = client.request(method, user.url(path), content=b'{"title": "x"}', headers=headers)
    assert_problem(resp, 415)
    assert client.get(user.url(), headers=user.headers).json() == []


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "GZIP"])
def test_an_encoded_body_is_415_naming_the_coding_accepted(
    client: TestClient, user: ApiUser, coding: str
) -> None:
    body = gzip.compress(b'{"title": "x"}') if coding.lower() == "gzip" else b'{"title": "x"}'
    headers = {**user.headers, "Content-Type": "application/json", "Content-Encoding": coding}
    resp = client.post(user.url(), content=body, headers=headers)
    assert_problem(resp, 415)
    assert resp.headers["Accept-Encoding"] == "identity"
    assert client.get(user.url(), headers=user.headers).json() == []
    for plain in ("identity", "Identity", ""):
        headers["Content-Encoding"] = plain
        sent = client.post(user.url(), content=b'{"title": "x"}', headers=headers)
        assert sent.status_code == 201, sent.text


def test_a_coding_on_any_content_encoding_line_is_415(client: TestClient, user: ApiUser) -> None:
    """The header is a list, also over several lines: the last one alone does not decide."""
    body = gzip.compress(b'{"title": "x"}')
    for codings in (["gzip", "identity"], ["identity", "gzip"], ["identity, gzip"]):
        lines = [("Content-Encoding", coding) for coding in codings]
        headers = [*user.headers.items(), ("Content-Type", "application/json"), *lines]
        assert_problem(client.post(user.url(), content=body, headers=headers), 415)
    assert client.get(user.url(), headers=user.headers).json() == []


def test_json_with_charset_is_accepted(client: TestClient, user: ApiUser) -> None:
    headers = {**user.headers, "Content-Type": "application/json; charset=utf-8"}
    resp = client.post(user.url(), content=b'{"title": "x"}', headers=headers)
    assert resp.status_code == 201


# Path ids -----------------------------------------------------------------------------

BAD_IDS = ["-1", "0", str(2**63), str(2**64 + 5), "9" * 40, "abc", "1.5", "1e3", "0x10", "%20"]


@pytest.mark.parametrize("task_id", BAD_IDS)
@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PUT", "", {"title": "x"}),
        ("DELETE", "", None),
        ("PATCH", "/complete", None),
    ],
)
def test_bad_path_ids_are_400_or_404(
    client: TestClient, user: ApiUser, task_id: str, method: str, suffix: str, body: Any
) -> None:
    resp = client.request(method, user.url(f"/{task_id}{suffix}"), json=body, headers=user.headers)
    assert resp.status_code in (400, 404), resp.text
    assert_problem(resp, resp.status_code)


def test_an_id_written_otherwise_does_not_address_the_task(
    client: TestClient, user: ApiUser
) -> None:
    """`1.0`, `+1`, `01` or ` 1` are not the id the API gave out: 400 on the path, and the
    task is untouched (int() would read each as the task's id; a DELETE of `1.0` deleted it)."""
    task = create_task(client, user, "keep")
    number = task["id"]
    for alias in (f"{number}.0", f"+{number}", f"0{number}", f"%20{number}", f"{number}%20"):
        for method in ("GET", "DELETE"):
            resp = client.request(method, user.url(f"/{alias}"), headers=user.headers)
            assert_validation_error(resp, "path.task_id")
    assert client.get(user.url(f"/{number}"), headers=user.headers).json() == task


def test_largest_valid_id_is_a_plain_404(client: TestClient, user: ApiUser) -> None:
    assert_problem(client.get(user.url(f"/{2**63 - 1}"), headers=user.headers), 404)


@pytest.mark.parametrize("user_id", ["a%00b", "x" * 129, "tab%09id", "nel%C2%85", "csi%C2%9B"])
def test_bad_user_ids_in_the_path_are_4xx(client: TestClient, user: ApiUser, user_id: str) -> None:
    resp = client.get(f"/api/{user_id}/tasks", headers=user.headers)
    assert resp.status_code in (400, 403, 404)
    body = assert_problem(resp, resp.status_code)
    # Checked by the route and by its auth dependency: listed once.
    errors = body.get("errors") or []
    assert len(errors) == len({(e["field"], e["message"]) for e in errors})


def test_control_characters_in_a_signed_subject_are_refused(
    client: TestClient, database: Database
) -> None:
    """Even a validly signed token cannot smuggle NUL into the users table (a 500 before),
    nor a C1 control (U+0085, NEL: a 200 that made the user's row before). Its subject is
    no user id, so the token is invalid: 401, whether the path spells the subject (checked
    after the token, as every path is) or names a well-formed user."""
    cases = (
        ("a\x00b", "a%00b"),
        ("a\nb", "a%0Ab"),
        ("a\x7fb", "a%7Fb"),
        ("dave\x85", "dave%C2%85"),
    )
    for subject, path in cases:
        token = create_dev_token(TEST_SECRET, subject)
        headers = {"Authorization": f"Bearer {token}"}
        for user_path in (path, "dave"):
            resp = client.get(f"/api/{user_path}/tasks", headers=headers)
            assert assert_problem(resp, 401)["type"].endswith("/token-invalid"), resp.text
    # (PostgreSQL takes no NUL at all, so that one cannot even be looked for.)
    subjects = [subject for subject, _ in cases if "\x00" not in subject]
    with database.engine.connect() as conn:
        query = sa.text("SELECT id FROM users WHERE id = ANY(:ids)")
        assert conn.execute(query, {"ids": [*subjects, "dave"]}).scalars().all() == []


# Error bodies -------------------------------------------------------------------------


def test_validation_errors_list_fields_and_do_not_echo_input(
    client: TestClient, user: ApiUser
) -> None:
    marker = "sk_live_" + secrets.token_hex(8)
    resp = client.post(
        user.url(),
        json={"title": "x" * 300 + marker, "description": marker * 100, "extra": marker},
        headers=user.headers,
    )
    body = assert_validation_error(resp, "body.title", "body.description", "body.extra")
    assert body["detail"]
    assert_no_leak(resp, marker)


def test_thousands_of_wrong_values_get_the_first_ones_and_their_count(
    client: TestClient, user: ApiUser
) -> None:
    # 64 KiB of `priority=`, on an invalid user id (with a valid token: without one, the
    # answer is a 401 before any of this is looked at).
    wrong = 6_400
    query = "&".join(["priority="] * wrong)
    resp = client.get(f"/api/{'a' * 129}/tasks?{query}", headers=user.headers)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    fields = [e["field"] for e in body["errors"]]
    assert fields[0] == "path.user_id"
    assert fields[1:] == [f"query.priority.{n}" for n in range(MAX_FIELD_ERRORS - 1)]
    assert body["detail"] == (
        f"The request is not valid. {wrong + 1} problems were found; "
        f"{MAX_FIELD_ERRORS} are listed, one for each wrong field first."
    )
    # Many wrong values of one field do not hide the one wrong value of another.
    query = "&".join(["priority=urgentish"] * 120) + "&limit=0&offset=-1&sort=zz"
    resp = client.get(user.url(f"?{query}"), headers=user.headers)
    body = assert_validation_error(resp)
    fields = [e["field"] for e in body["errors"]]
    assert len(fields) == MAX_FIELD_ERRORS
    # One for each wrong field first: a client showing the first few shows every field.
    assert set(fields[:4]) == {"query.priority.0", "query.limit", "query.offset", "query.sort"}
    assert fields[4:] == [f"query.priority.{n}" for n in range(1, MAX_FIELD_ERRORS - 3)]
    # Thousands of unknown keys in a body, the same way.
    many_keys = {"title": "x", **{f"k{n}": 0 for n in range(5_000)}}
    resp = client.post(user.url(), json=many_keys, headers=user.headers)
    body = assert_validation_error(resp, *(f"body.k{n}" for n in range(MAX_FIELD_ERRORS)))
    assert len(body["errors"]) == MAX_FIELD_ERRORS
    assert "5000 problems were found" in body["detail"]


def test_malformed_json_is_400_problem(client: TestClient, user: ApiUser) -> None:
    resp = client.post(
        user.url(),
        content=b'{"title": ',
        headers={**user.headers, "Content-Type": "application/json"},
    )
    assert_validation_error(resp)


def test_deeply_nested_json_is_400(client: TestClient, user: ApiUser) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    resp = client.post(
        user.url(),
        content=nested[:LIMIT],
        headers={**user.headers, "Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    assert_problem(resp, 400)


def test_auth_errors_do_not_echo_the_token(client: TestClient, user: ApiUser) -> None:
    tampered = user.token[:-4] + ("AAAA" if not user.token.endswith("AAAA") else "BBBB")
    resp = client.get(user.url(), headers={"Authorization": f"Bearer {tampered}"})
    assert_problem(resp, 401)
    assert_no_leak(resp, tampered, tampered.split(".")[1])


# Failed commits -----------------------------------------------------------------------


@dataclass
class CommitFailure:
    """Markers that make a deferred (commit-time) trigger on `tasks` raise."""

    insert_title: str
    doomed_description: str


@pytest.fixture
def commit_failure(database: Database) -> Iterator[CommitFailure]:
    """A real PostgreSQL commit failure, like the audit guard's: a deferred constraint trigger.

    INSERTs with `insert_title` fail at COMMIT, as do UPDATEs/DELETEs of a task whose
    description is `doomed_description`.
    """
    marker = secrets.token_hex(6)
    failure = CommitFailure(f"insert-fails-{marker}", f"doomed-{marker}")
    function, trigger = f"test_fail_{marker}", f"test_fail_{marker}"
    with database.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"""
                CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF (TG_OP = 'INSERT' AND NEW.title = '{failure.insert_title}')
                       OR (TG_OP <> 'INSERT' AND OLD.description = '{failure.doomed_description}')
                    THEN
                        RAISE EXCEPTION 'forced commit failure: SELECT * FROM tasks';
                    END IF;
                    RETURN NULL;
                END $$
                """
            )
        )
        conn.execute(
            sa.text(
                f"CREATE CONSTRAINT TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON tasks "
                f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {function}()"
            )
        )
    try:
        yield failure
    finally:
        with database.engine.begin() as conn:
            conn.execute(sa.text(f"DROP TRIGGER {trigger} ON tasks"))
            conn.execute(sa.text(f"DROP FUNCTION {function}()"))


def _audit_count(database: Database, user_id: str) -> int:
    with database.engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM audit_events WHERE user_id = :u")
        return int(conn.execute(query, {"u": user_id}).scalar_one())


def test_failed_commit_is_an_error_response_and_leaves_nothing(
    client: TestClient, user: ApiUser, database: Database, commit_failure: CommitFailure
) -> None:
    """The commit runs before the response: its failure is never reported as success."""
    resp = client.post(
        user.url(), json={"title": commit_failure.insert_title}, headers=user.headers
    )
    assert resp.status_code >= 500
    assert_problem(resp, resp.status_code)
    assert_no_leak(resp)
    assert client.get(user.url(), headers=user.headers).json() == []
    assert _audit_count(database, user.user_id) == 0

    task = create_task(client, user, "stays", description=commit_failure.doomed_description)
    url = user.url(f"/{task['id']}")
    events = _audit_count(database, user.user_id)
    for method, path, body in (
        ("PUT", "", {"title": "changed"}),
        ("PATCH", "/complete", None),
        ("PATCH", "/complete", {"completed": True}),
        ("DELETE", "", None),
    ):
        resp = client.request(method, url + path, json=body, headers=user.headers)
        assert resp.status_code >= 500, (method, path, resp.status_code)
        assert_problem(resp, resp.status_code)
        assert_no_leak(resp)
    after = client.get(url, headers=user.headers)
    assert after.status_code == 200 and after.json() == task
    assert _audit_count(database, user.user_id) == events
    assert database.engine.pool.checkedout() == 0


# Connections go back to the pool ------------------------------------------------------


def test_every_request_returns_its_connection(
    client: TestClient, make_user: MakeUser, database: Database
) -> None:
    alice, bob = make_user(), make_user()
    task = create_task(client, alice, "pooled")
    url = alice.url(f"/{task['id']}")
    stale = '"stale"'
    json_headers = {**alice.headers, "Content-Type": "application/json"}
    requests: list[tuple[str, str, dict[str, str], Any, int]] = [
        ("GET", alice.url(), alice.headers, None, 200),
        ("GET", url, alice.headers, None, 200),
        ("PUT", url, alice.headers, {"title": "renamed"}, 200),
        ("PATCH", url + "/complete", alice.headers, None, 200),
        ("GET", alice.url("/999999999"), alice.headers, None, 404),
        ("PUT", alice.url("/999999999"), alice.headers, {"title": "x"}, 404),
        ("DELETE", bob.url(f"/{task['id']}"), bob.headers, None, 404),
        ("POST", alice.url(), alice.headers, {"title": ""}, 400),
        ("PUT", url, alice.headers, {}, 400),
        ("GET", alice.url("?limit=0"), alice.headers, None, 400),
        ("GET", url, bob.headers, None, 403),
        ("POST", alice.url(), bob.headers, {"title": "x"}, 403),
        ("PUT", url, {**alice.headers, "If-Match": stale}, {"title": "x"}, 412),
        ("DELETE", url, {**alice.headers, "If-Match": stale}, None, 412),
        ("GET", alice.url(), {"Authorization": "Bearer nope"}, None, 401),
        ("POST", alice.url(), {**alice.headers, "Content-Type": "text/plain"}, "x", 415),
        ("DELETE", url, alice.headers, None, 204),
    ]
    for _ in range(3):
        for method, target, headers, body, expected in requests:
            if method == "DELETE" and expected == 204:
                continue
            resp = client.request(method, target, json=body, headers=headers)
            assert resp.status_code == expected, (method, target, resp.text)
    big = client.post(alice.url(), content=b"x" * (LIMIT + 1), headers=json_headers)
    assert big.status_code == 413
    last = requests[-1]
    assert client.request(last[0], last[1], headers=last[2]).status_code == 204
    assert database.engine.pool.checkedout() == 0


# The database is down: 503, never 500 -------------------------------------------------


def test_unreachable_database_is_503(settings: Settings, user: ApiUser) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/todo"
    down = Database(
        build_engine(settings.model_copy(update={"db_connect_timeout_seconds": 1}), url)
    )
    try:
        app = create_app(settings, down)
        with TestClient(app, raise_server_exceptions=False) as client:
            ready = client.get("/readyz")
            assert_problem(ready, 503)
            assert ready.headers["Retry-After"]
            assert client.get("/healthz").status_code == 200
            for method, path, body in (
                ("GET", "", None),
                ("POST", "", {"title": "x"}),
                ("GET", "/1", None),
            ):
                resp = client.request(method, user.url(path), json=body, headers=user.headers)
                assert_problem(resp, 503)
                assert resp.headers["Retry-After"]
                assert_no_leak(resp, url)
    finally:
        down.dispose()


def test_a_statement_timeout_is_a_503_that_says_so(
    settings: Settings, database: Database, user: ApiUser, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL cancelled the statement (DB_STATEMENT_TIMEOUT_MS): the database answered,
    slowly, so it is not reported as unavailable. Still retryable."""
    caplog.set_level("INFO", logger="service.errors")
    resp = write_past_the_statement_timeout(settings, database.engine, user.headers, user.url())
    problem = assert_problem(resp, 503)
    assert problem["type"] == "tag:todo-api,2026:problems/unavailable"
    assert problem["detail"] == "The database did not answer in time; try again shortly."
    assert int(resp.headers["Retry-After"]) > 0
    (line,) = [r for r in caplog.records if r.name == "service.errors"]
    assert (line.levelname, line.getMessage()) == ("ERROR", "database statement timed out")
    assert line.sqlstate == "57014"  # type: ignore[attr-defined]
    assert line.reason == "canceling statement due to statement timeout"  # type: ignore[attr-defined]
