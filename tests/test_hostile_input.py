"""Hostile and odd input through HTTP: only documented 4xx answers, never a 5xx, no change.

Extends tests/test_errors.py (sizes, path ids, nesting) and tests/test_auth_api.py (the
common bad tokens) with what they do not cover: invalid UTF-8 and odd JSON on every write,
repeated and unknown query parameters, odd headers, and the remaining JWT attacks over HTTP,
with a local server named in the tokens proving that nothing in a token makes the service
send a request anywhere.
"""

from __future__ import annotations

import base64
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from jwt.warnings import InsecureKeyLengthWarning

from service.auth import MAX_TOKEN_LENGTH
from service.database import Database
from service.jsonbody import JsonBodyRoute
from service.routing import every_route
from service.settings import Settings
from tests.jwt_helpers import (
    JwksServer,
    SigningKey,
    better_auth_claims,
    generate_key,
    hmac_token,
    random_id,
    unsigned_token,
)
from tests.reliability_helpers import CountingHttpServer
from tests.support import (
    TEST_SECRET,
    WWW_AUTHENTICATE,
    ApiUser,
    LiveServer,
    MakeUser,
    assert_no_leak,
    assert_problem,
    assert_validation_error,
    create_task,
    jwks_app,
)

JSON = "application/json"


@pytest.fixture
def task(client: TestClient, user: ApiUser) -> dict[str, Any]:
    return create_task(client, user, "original", description="unchanged")


def _unchanged(client: TestClient, user: ApiUser, task: dict[str, Any]) -> None:
    assert client.get(user.url(f"/{task['id']}"), headers=user.headers).json() == task
    assert [t["id"] for t in client.get(user.url(), headers=user.headers).json()] == [task["id"]]


# Bodies on every write ----------------------------------------------------------------

BAD_BODIES: dict[str, bytes] = {
    "invalid-utf8-in-string": b'{"title": "\xff\xfe"}',
    "invalid-utf8-only": b"\xc3\x28",
    "truncated-utf8": b'{"title": "caf\xc3"}',
    "overlong-utf8-slash": b'{"title": "\xc0\xaf"}',
    "lone-surrogate-escape": b'{"title": "\\udfff\\ud800", "completed": true}',
    "nul-escape": b'{"title": "a\\u0000", "completed": true}',
    "raw-nul-byte": b'{"title": "a\x00b", "completed": true}',
    "deep-objects": b'{"":' * 10_000 + b"1" + b"}" * 10_000,
    "deep-arrays": b"[" * 30_000 + b"]" * 30_000,
    "many-keys": b"{" + b",".join(b'"k%d": 1' % i for i in range(6_000)) + b"}",
    "long-array": b"[" + b",".join(b"1" for _ in range(30_000)) + b"]",
    "huge-integer": b'{"completed": ' + b"9" * 30_000 + b"}",
    "huge-float": b'{"completed": 1e999999}',
    "nan": b'{"completed": NaN}',
    "number-as-bool": b'{"completed": 0}',
    "string-as-bool": b'{"completed": "true"}',
    "trailing-garbage": b'{"completed": true} {}',
    "bare-string": b'"title"',
}


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
@pytest.mark.parametrize(
    ("method", "suffix"), [("POST", None), ("PUT", ""), ("PATCH", "/complete")]
)
def test_odd_bodies_are_400_and_change_nothing(
    client: TestClient,
    user: ApiUser,
    task: dict[str, Any],
    raw: bytes,
    method: str,
    suffix: str | None,
) -> None:
    url = user.url() if suffix is None else user.url(f"/{task['id']}{suffix}")
    resp = client.request(method, url, content=raw, headers={**user.headers, "Content-Type": JSON})
    body = assert_validation_error(resp)
    assert all(e["field"].split(".")[0] == "body" for e in body["errors"]), body
    assert_no_leak(resp)
    _unchanged(client, user, task)


@pytest.mark.parametrize(
    ("raw", "title"),
    [
        (b'\xef\xbb\xbf{"title": "with BOM"}', "with BOM"),
        ('{"title": "UTF-16"}'.encode("utf-16"), "UTF-16"),  # RFC 8259 readers may accept it
        ('{"title": "\u00e9\u6f22\U0001f600"}'.encode(), "\u00e9\u6f22\U0001f600"),
    ],
    ids=["utf8-bom", "utf16", "non-ascii"],
)
def test_unusual_but_valid_json_is_read_as_json(
    client: TestClient, user: ApiUser, raw: bytes, title: str
) -> None:
    resp = client.post(user.url(), content=raw, headers={**user.headers, "Content-Type": JSON})
    assert resp.status_code == 201, resp.text
    assert resp.json()["title"] == title


# Each would be accepted if one of the repeated keys were dropped (json.loads keeps the last).
DUPLICATE_KEYS: dict[str, tuple[str, str, bytes, str]] = {
    "create-task": ("POST", "", b'{"title": "first", "title": "last"}', "title"),
    "same-value-twice": ("POST", "", b'{"title": "same", "title": "same"}', "title"),
    "spelled-with-an-escape": ("POST", "", b'{"title": "a", "t\\u0069tle": "b"}', "title"),
    "update-task": ("PUT", "/{task}", b'{"description": null, "description": "x"}', "description"),
    "complete-task": (
        "PATCH",
        "/{task}/complete",
        b'{"completed": true, "completed": false}',
        "completed",
    ),
    "create-tag": ("POST", "tags", b'{"name": "a", "name": "b"}', "name"),
    "rename-tag": ("PATCH", "tags/{tag}", b'{"name": "c", "name": "d"}', "name"),
    "a-list-twice": ("PUT", "/{task}", b'{"tags": ["x"], "title": "t", "tags": ["y"]}', "tags"),
}


@pytest.mark.parametrize("case", list(DUPLICATE_KEYS))
def test_a_body_with_a_repeated_key_is_400_on_every_write(
    client: TestClient, user: ApiUser, task: dict[str, Any], case: str
) -> None:
    """One error on the body, naming the key; nothing written (no "last one wins")."""
    tags = f"/api/{user.user_id}/tags"
    tag = client.post(tags, json={"name": "kept"}, headers=user.headers).json()
    method, path, raw, key = DUPLICATE_KEYS[case]
    path = path.format(task=task["id"], tag=tag["id"])
    url = tags + path[len("tags") :] if path.startswith("tags") else user.url(path)
    resp = client.request(method, url, content=raw, headers={**user.headers, "Content-Type": JSON})
    body = assert_validation_error(resp, "body")
    assert len(body["errors"]) == 1, body
    assert "duplicate key" in body["errors"][0]["message"], body
    assert f'"{key}"' in body["errors"][0]["message"], body
    _unchanged(client, user, task)
    assert client.get(tags, headers=user.headers).json() == [tag]


def test_every_route_with_a_body_reads_it_with_unique_keys(app: FastAPI) -> None:
    """The rule is the route class's: a new router that takes a body must use it."""
    with_body = [
        route
        for route in every_route(app.routes)
        if isinstance(route, APIRoute) and route.body_field is not None
    ]
    assert len(with_body) >= 5
    assert [r.path for r in with_body if not isinstance(r, JsonBodyRoute)] == []


def test_every_write_route_acts_only_on_a_request_received_whole(app: FastAPI) -> None:
    """So is reading the body of a write that takes none (a DELETE, the feed's ticket) before
    it acts: a new router of writes must use the route class."""
    writes = [
        route
        for route in every_route(app.routes)
        if isinstance(route, APIRoute) and route.methods & {"POST", "PUT", "PATCH", "DELETE"}
    ]
    assert {"DELETE"} <= {method for route in writes for method in route.methods}
    assert [r.path for r in writes if not isinstance(r, JsonBodyRoute)] == []


def test_oversized_body_on_a_real_socket_is_413_for_every_write(
    live_server: LiveServer, user: ApiUser
) -> None:
    """A body over the limit, declared or chunked, over uvicorn: 413 before it is read. A
    DELETE takes no body, but reads one sent before it acts: it too (it was carried out)."""
    body = b'{"title": "' + b"x" * (70 * 1024) + b'"}'
    headers = {**user.headers, "Content-Type": JSON}
    with live_server.client() as http:
        task = create_task(http, user, "kept")
        for method, path in (
            ("POST", ""),
            ("PUT", f"/{task['id']}"),
            ("PATCH", f"/{task['id']}/complete"),
            ("DELETE", f"/{task['id']}"),
        ):
            assert_problem(http.request(method, user.url(path), content=body, headers=headers), 413)
        assert http.get(user.url(f"/{task['id']}"), headers=user.headers).json() == task


def test_a_delete_takes_a_body_only_as_any_write_does(
    client: TestClient, user: ApiUser, task: dict[str, Any]
) -> None:
    """A DELETE reads a body sent with it before it acts: one that is not JSON is 415 and
    deletes nothing (it was ignored, and the task deleted); a JSON one is read and dropped."""
    url = user.url(f"/{task['id']}")
    resp = client.request(
        "DELETE", url, content=b"gone", headers={**user.headers, "Content-Type": "text/plain"}
    )
    assert_problem(resp, 415)
    _unchanged(client, user, task)
    resp = client.request(
        "DELETE", url, content=b'{"why": "done"}', headers={**user.headers, "Content-Type": JSON}
    )
    assert resp.status_code == 204, resp.text
    assert client.get(url, headers=user.headers).status_code == 404


def test_an_empty_chunked_body_is_no_body_on_a_real_socket(
    live_server: LiveServer, user: ApiUser
) -> None:
    """A chunked body that ends empty is no body, as `Content-Length: 0` is: a Next.js route
    handler that proxies a DELETE passes its request's (empty) body stream on, which undici
    sends chunked, without a Content-Type (the browser sent none). It was 415, and nothing
    deleted (once DELETE bodies were guarded). A chunked body with a byte in it is still 415."""

    def chunks(*parts: bytes) -> Iterator[bytes]:
        yield from parts

    with live_server.client() as http:
        task = create_task(http, user, "kept")
        url = user.url(f"/{task['id']}")
        text = {**user.headers, "Content-Type": "text/plain"}
        resp = http.request("DELETE", url, content=chunks(b"gone"), headers=text)
        assert resp.request.headers["transfer-encoding"] == "chunked"
        assert_problem(resp, 415)
        assert http.get(url, headers=user.headers).json() == task
        resp = http.request("DELETE", url, content=chunks(), headers=user.headers)
        assert resp.request.headers["transfer-encoding"] == "chunked"
        assert resp.status_code == 204, resp.text
        assert http.get(url, headers=user.headers).status_code == 404
        resp = http.post(user.url(), content=chunks(), headers=user.headers)
        assert_problem(resp, 400)  # a POST that needs a body: "Field required", not 415


# Control characters in text fields -----------------------------------------------------

# C0 (tab and line breaks included), DEL and C1: none in a single-line field such as a title.
CONTROLS_IN_A_LINE = {
    "nul": "a\x00b",
    "bell": "a\x07b",
    "tab": "a\tb",
    "line-feed": "two\nlines",
    "carriage-return": "a\rb",
    "escape-sequence": "\x1b[31mred\x1b[0m",
    "unit-separator": "a\x1fb",
    "delete": "a\x7fb",
    "c1-csi": "a\x9b2Jb",
    "next-line": "a\x85b",
}


def _assert_control_refused(resp: httpx.Response, field: str) -> None:
    body = assert_validation_error(resp, field)
    assert [e["field"] for e in body["errors"]] == [field], body
    assert "control characters" in body["errors"][0]["message"], body


@pytest.mark.parametrize("text", list(CONTROLS_IN_A_LINE.values()), ids=list(CONTROLS_IN_A_LINE))
def test_control_characters_in_a_title_are_400(
    client: TestClient, user: ApiUser, task: dict[str, Any], text: str
) -> None:
    """Inside the title, after trimming: surrounding whitespace (tab, newline) is trimmed."""
    _assert_control_refused(
        client.post(user.url(), json={"title": text}, headers=user.headers), "body.title"
    )
    _assert_control_refused(
        client.put(user.url(f"/{task['id']}"), json={"title": text}, headers=user.headers),
        "body.title",
    )
    _unchanged(client, user, task)
    assert create_task(client, user, "\t\r\n Buy milk \x1c\n")["title"] == "Buy milk"


@pytest.mark.parametrize(
    "text",
    ["a\x00b", "bell\x07", "\x0bvertical tab", "form\x0cfeed", "\x1b[2J", "a\x7fb", "a\x9bb"],
)
def test_control_characters_in_a_description_are_400(
    client: TestClient, user: ApiUser, task: dict[str, Any], text: str
) -> None:
    _assert_control_refused(
        client.post(user.url(), json={"title": "t", "description": text}, headers=user.headers),
        "body.description",
    )
    _assert_control_refused(
        client.put(user.url(f"/{task['id']}"), json={"description": text}, headers=user.headers),
        "body.description",
    )
    _unchanged(client, user, task)
    # Multi-line: tab, line feed and carriage return are text there, stored as sent.
    lines = "first line\r\n\tindented\nlast "
    assert create_task(client, user, "t", description=lines)["description"] == lines


@pytest.mark.parametrize("text", ["a\x01", "\x1b[2J", "a\x7f", "a\x9b"])
def test_control_characters_in_the_search_text_are_400(
    client: TestClient, user: ApiUser, text: str
) -> None:
    """The search text follows the description's rule: it searches descriptions too."""
    _assert_control_refused(
        client.get(user.url(), params={"q": text}, headers=user.headers), "query.q"
    )
    resp = client.get(user.url(), params={"q": "a\tb\nc"}, headers=user.headers)
    assert resp.status_code == 200, resp.text


# Unicode's default-ignorable characters (zero-width ones, the byte order mark, bidi controls,
# the soft hyphen, fillers, variation selectors, tag characters): nothing to see, so blank.
INVISIBLE = {
    "soft-hyphen": "\u00ad",
    "invisible-operators": "\u2061\u2062\u2063\u2064",
    "hangul-fillers": "\u3164\uffa0\u115f\u1160",
    "mongolian-vowel-separator": "\u180e",
    "variation-selectors": "\ufe0f\U000e0100",
    "tag-characters": "\U000e0041\U000e007f",
    "musical-format": "\U0001d173",
    "zero-width-space": "\u200b",
    "zero-width-joiners": "\u200c\u200d",
    "word-joiner": "\u2060",
    "byte-order-mark": "\ufeff",
    "bidi-marks": "\u200e\u200f",
    "bidi-embeddings": "\u202a\u202b\u202c\u202d\u202e",
    "bidi-isolates": "\u2066\u2067\u2068\u2069",
    "mixed-with-spaces": " \u200b\u3000\ufeff\u00a0",
}


def _assert_blank(resp: httpx.Response, field: str) -> None:
    body = assert_validation_error(resp, field)
    assert [e["field"] for e in body["errors"]] == [field], body
    assert "must not be blank" in body["errors"][0]["message"], body


@pytest.mark.parametrize("text", list(INVISIBLE.values()), ids=list(INVISIBLE))
def test_a_title_of_invisible_characters_is_blank(
    client: TestClient, user: ApiUser, task: dict[str, Any], text: str
) -> None:
    _assert_blank(client.post(user.url(), json={"title": text}, headers=user.headers), "body.title")
    _assert_blank(
        client.put(user.url(f"/{task['id']}"), json={"title": text}, headers=user.headers),
        "body.title",
    )
    _unchanged(client, user, task)
    # Only the blank rule: beside visible text they are kept as sent.
    assert create_task(client, user, f"a{text}b")["title"] == f"a{text}b"


@pytest.mark.parametrize("text", list(INVISIBLE.values()), ids=list(INVISIBLE))
def test_a_tag_name_of_invisible_characters_is_blank(
    client: TestClient, user: ApiUser, task: dict[str, Any], text: str
) -> None:
    tags = f"/api/{user.user_id}/tags"
    _assert_blank(client.post(tags, json={"name": text}, headers=user.headers), "body.name")
    tag = client.post(tags, json={"name": "kept"}, headers=user.headers).json()
    _assert_blank(
        client.patch(f"{tags}/{tag['id']}", json={"name": text}, headers=user.headers),
        "body.name",
    )
    _assert_blank(
        client.put(user.url(f"/{task['id']}"), json={"tags": [text]}, headers=user.headers),
        "body.tags.0",
    )
    _assert_blank(client.get(user.url(), params={"tag": text}, headers=user.headers), "query.tag.0")
    _unchanged(client, user, task)
    assert [t["name"] for t in client.get(tags, headers=user.headers).json()] == ["kept"]


def _user_claims(database: Database, user_id: str) -> tuple[Any, ...] | None:
    with database.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT email, name FROM users WHERE id = :id"), {"id": user_id}
        ).first()
    return tuple(row) if row else None


@pytest.mark.parametrize("text", ["Bob\x1b[2J", "Bob\nBobson", "Bob\x7f", "Bob\x9b"])
def test_a_token_name_or_email_with_control_characters_is_not_stored(
    client: TestClient, make_user: MakeUser, database: Database, text: str
) -> None:
    """The claims come signed from the auth server: the request goes on, the value is left out."""
    user = make_user(email=f"{text}@example.com", name=text)
    assert client.get(user.url(), headers=user.headers).status_code == 200
    assert _user_claims(database, user.user_id) == (None, None)


# Query strings, paths and headers -----------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("foo=bar&%00=1&%FF=%FF&status=all", 400),  # unknown parameters are refused
        ("status=pending&status=completed", 400),  # repeated: neither one counts
        ("limit=600&limit=1", 400),
        ("limit=1&limit=600", 400),
        ("sort=title&sort=rank", 400),
        ("q=%FF%FE", 200),  # invalid UTF-8 is decoded with replacement characters
        ("q=%ED%A0%80", 200),  # an encoded surrogate, likewise
        ("q=%00", 400),
        ("q=" + "x" * 50_000, 400),
        ("limit=%EF%BC%91", 400),  # a full-width digit one
        ("offset=" + "9" * 40, 400),
        ("limit=1e3", 400),
        ("limit=", 400),
    ],
)
def test_query_strings(client: TestClient, user: ApiUser, query: str, status: int) -> None:
    resp = client.get(f"{user.url()}?{query}", headers=user.headers)
    assert resp.status_code == status, resp.text
    if status >= 400:
        assert_validation_error(resp)


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("since=%FF", 400),
        ("since=1700000000", 400),  # a Unix time is not an RFC 3339 date-time
        ("until=-0.5", 400),
        ("since=2026-01-01T00:00:00Z&since=garbage", 400),
        ("since=2026-01-01T00:00:00.0000001Z", 200),  # rounded up to the microsecond
        ("until=9999-12-31T23:59:59.9999999Z", 400),  # ... which is out of range
        ("cursor=%FF%00", 400),
        ("task_id=1&task_id=x", 400),
        ("action=task.created&action=task.nope", 400),
        ("request_id=%00", 400),
        ("unknown=%FF", 400),
    ],
)
def test_audit_query_strings(client: TestClient, user: ApiUser, query: str, status: int) -> None:
    resp = client.get(f"/api/{user.user_id}/audit-events?{query}", headers=user.headers)
    assert resp.status_code == status, resp.text
    if status >= 400:
        assert_validation_error(resp)


@pytest.mark.parametrize(
    "path", ["%00", "%FF", "%D9%A1", "..%2F..%2Fhealthz", "1%2F2", "1;2", "1%0A", "-0", "1.0e1"]
)
def test_odd_task_ids_in_the_path_are_400_or_404(
    client: TestClient, user: ApiUser, path: str
) -> None:
    for method, suffix in (
        ("GET", ""),
        ("DELETE", ""),
        ("PATCH", "/complete"),
        ("GET", "/history"),
    ):
        resp = client.request(method, user.url(f"/{path}{suffix}"), headers=user.headers)
        assert resp.status_code in (400, 404), (method, path, resp.text)
        assert_problem(resp, resp.status_code)


@pytest.mark.parametrize("user_path", ["%FF", "%C0%AF", "..", "a%2Fb", "x" * 5000])
def test_odd_user_ids_in_the_path_are_4xx(
    client: TestClient, user: ApiUser, user_path: str
) -> None:
    resp = client.get(f"/api/{user_path}/tasks", headers=user.headers)
    assert resp.status_code in (400, 403, 404), resp.text
    assert_problem(resp, resp.status_code)


@pytest.mark.parametrize(
    ("if_match", "status"),
    [
        (b"\xe9", 412),
        (b"x" * 257, 400),
        (b",,,", 412),
        (b'W/"1-1", "nope"', 412),
        (b" ", 412),
    ],
    ids=["latin-1", "too-long", "commas", "list", "blank"],
)
def test_odd_if_match_headers(
    client: TestClient, user: ApiUser, task: dict[str, Any], if_match: bytes, status: int
) -> None:
    headers = [*user.headers.items(), ("If-Match", if_match)]
    for method, suffix, body in (("PUT", "", {"title": "x"}), ("DELETE", "", None)):
        resp = client.request(
            method,
            user.url(f"/{task['id']}{suffix}"),
            json=body,
            headers=headers,  # type: ignore[arg-type]
        )
        assert_problem(resp, status)
    _unchanged(client, user, task)


def test_repeated_content_type_and_odd_media_types(client: TestClient, user: ApiUser) -> None:
    for content_type, status in (
        (b"application/json; charset=latin-1", 201),  # JSON is UTF-8 whatever the label says
        (b"application/merge-patch+json", 201),
        (b"APPLICATION/JSON", 201),
        (b"application/jsonx", 415),
        (b"\xff/\xfe", 415),
    ):
        resp = client.post(
            user.url(),
            content=b'{"title": "typed"}',
            headers=[*user.headers.items(), ("Content-Type", content_type)],  # type: ignore[arg-type]
        )
        assert resp.status_code == status, (content_type, resp.text)


# JWT attacks over HTTP ----------------------------------------------------------------


@dataclass
class Ctx:
    origin: str  # the configured Better Auth (JWKS) origin
    key: SigningKey  # its real signing key
    attacker: SigningKey
    evil: str  # a server the attacker controls, which must never be contacted
    user_id: str

    def claims(self, **overrides: Any) -> dict[str, Any]:
        return better_auth_claims(self.origin, user_id=self.user_id, **overrides)


def _hs(ctx: Ctx, alg: str = "HS256", headers: dict[str, Any] | None = None) -> str:
    """Signed with the real shared secret (HS384/HS512 warn that it is short for them)."""
    now = int(time.time())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(
            {"sub": ctx.user_id, "exp": now + 300}, TEST_SECRET, algorithm=alg, headers=headers
        )


def _pad_to(ctx: Ctx, size: int) -> str:
    return ctx.key.sign(ctx.claims(padding="p" * size))


# Each returns the bearer token; all must be 401 (the table in test_auth_api.py has the rest:
# expired, wrong key, wrong issuer/audience, missing claims, alg none, HS256 with a PEM).
JWT_CASES: dict[str, Callable[[Ctx], str]] = {
    "alg-None": lambda c: unsigned_token({"alg": "None", "typ": "JWT"}, c.claims()),
    "alg-NONE": lambda c: unsigned_token({"alg": "NONE", "kid": c.key.kid}, c.claims()),
    "alg-none-with-real-signature": lambda c: (
        unsigned_token({"alg": "none"}, c.claims()).rstrip(".")
        + "."
        + c.key.sign(c.claims()).split(".")[2]
    ),
    "alg-missing": lambda c: unsigned_token({"kid": c.key.kid}, c.claims(), b"sig"),
    "hs512-with-the-secret": lambda c: _hs(c, "HS512"),
    "hs384-with-the-secret": lambda c: _hs(c, "HS384"),
    "hs256-signed-with-the-jwk-json": lambda c: hmac_token(
        {"alg": "HS256", "kid": c.key.kid},
        c.claims(),
        json.dumps(c.key.public_jwk()).encode(),
    ),
    "crit-exp": lambda c: c.key.sign_exact(
        {"alg": c.key.alg, "kid": c.key.kid, "crit": ["exp"], "exp": 1}, c.claims()
    ),
    "crit-b64": lambda c: c.key.sign_exact(
        {"alg": c.key.alg, "kid": c.key.kid, "crit": ["b64"], "b64": False}, c.claims()
    ),
    "crit-on-hs256": lambda c: _hs(c, headers={"crit": ["exp"]}),
    "jku-attacker-key": lambda c: c.attacker.sign(c.claims(), headers={"jku": c.evil + "/jwks"}),
    "jku-real-key": lambda c: c.key.sign(c.claims(), headers={"jku": c.evil + "/jwks"}),
    "x5u-attacker-key": lambda c: c.attacker.sign(c.claims(), headers={"x5u": c.evil + "/cert"}),
    "x5u-real-key": lambda c: c.key.sign(c.claims(), headers={"x5u": c.evil + "/cert"}),
    "jwk-embedded-attacker-key": lambda c: c.attacker.sign(
        c.claims(), headers={"jwk": c.attacker.public_jwk()}
    ),
    "jwk-embedded-with-x5u": lambda c: c.attacker.sign(
        c.claims(), headers={"jwk": {**c.attacker.public_jwk(), "x5u": c.evil + "/cert"}}
    ),
    "jku-on-hs256": lambda c: _hs(c, headers={"jku": c.evil + "/jwks"}),
    "x5c-attacker-key-real-kid": lambda c: generate_key(c.key.alg, kid=c.key.kid).sign(
        c.claims(), headers={"x5c": [base64.b64encode(c.attacker.public_pem()).decode()]}
    ),
    "kid-is-a-url": lambda c: c.attacker.sign(c.claims(), headers={"kid": c.evil + "/key"}),
    "kid-path-traversal": lambda c: c.attacker.sign(
        c.claims(), headers={"kid": "../../../../etc/passwd"}
    ),
    "kid-sql": lambda c: c.attacker.sign(c.claims(), headers={"kid": "x' OR '1'='1"}),
    "kid-not-a-string": lambda c: c.key.sign_exact(
        {"alg": c.key.alg, "kid": {"url": c.evil}}, c.claims()
    ),
    "issuer-is-the-attacker": lambda c: c.attacker.sign(c.claims(iss=c.evil, aud=c.evil)),
    "attacker-key-real-kid": lambda c: generate_key(c.key.alg, kid=c.key.kid).sign(c.claims()),
    "token-100kb": lambda c: _pad_to(c, 100 * 1024),
    "token-just-over-the-bound": lambda c: _pad_to(c, MAX_TOKEN_LENGTH),
    "five-segments-jwe-shape": lambda c: c.key.sign(c.claims()) + ".AAAA.BBBB",
    "whitespace-inside": lambda c: c.key.sign(c.claims()).replace(".", ". ", 1),
}


@pytest.fixture
def evil() -> Iterator[CountingHttpServer]:
    with CountingHttpServer() as server:
        yield server


@pytest.fixture(scope="module")
def real_key() -> SigningKey:
    return generate_key("EdDSA")


@pytest.fixture
def jwks_mode(
    settings: Settings, database: Database, real_key: SigningKey
) -> Iterator[tuple[TestClient, JwksServer]]:
    """Better Auth at a local JWKS server, the shared secret too, and the default refetch
    interval: an unknown kid may cause at most one fetch per interval, and only from here."""
    with jwks_app(settings, database, real_key, jwks_min_refetch_seconds=30) as pair:
        yield pair


def _assert_401(resp: httpx.Response, token: str) -> None:
    assert_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"] == WWW_AUTHENTICATE
    for segment in token.split("."):
        assert len(segment) < 16 or segment not in resp.text


@pytest.mark.parametrize("case", list(JWT_CASES))
def test_hostile_tokens_are_401_and_make_no_outbound_request(
    case: str,
    jwks_mode: tuple[TestClient, JwksServer],
    real_key: SigningKey,
    evil: CountingHttpServer,
) -> None:
    client, jwks = jwks_mode
    ctx = Ctx(jwks.origin, real_key, generate_key(real_key.alg), evil.origin, random_id())
    good = real_key.sign(ctx.claims())
    assert client.get(
        f"/api/{ctx.user_id}/tasks", headers={"Authorization": f"Bearer {good}"}
    ).is_success
    fetched = jwks.request_count

    token = JWT_CASES[case](ctx)
    for method, path, body in (
        ("GET", "", None),
        ("POST", "", {"title": "x"}),
        ("DELETE", "/1", None),
    ):
        resp = client.request(
            method,
            f"/api/{ctx.user_id}/tasks{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        _assert_401(resp, token)
    assert evil.request_count == 0
    # The token could not make the service fetch keys again (the interval has not passed).
    assert jwks.request_count == fetched


@pytest.mark.parametrize("case", list(JWT_CASES))
def test_hostile_tokens_without_a_key_server_are_401_with_no_outbound_request(
    case: str, client: TestClient, evil: CountingHttpServer, real_key: SigningKey
) -> None:
    """HS256-only mode (no JWKS configured): the same tokens, and still nothing is fetched."""
    ctx = Ctx(
        "https://auth.example", real_key, generate_key(real_key.alg), evil.origin, random_id()
    )
    token = JWT_CASES[case](ctx)
    _assert_401(
        client.get(f"/api/{ctx.user_id}/tasks", headers={"Authorization": f"Bearer {token}"}), token
    )
    assert evil.request_count == 0


def test_token_for_another_user_is_403_whatever_the_algorithm(
    jwks_mode: tuple[TestClient, JwksServer], real_key: SigningKey, make_user: MakeUser
) -> None:
    client, jwks = jwks_mode
    victim = make_user()
    for token in (
        real_key.sign(better_auth_claims(jwks.origin, user_id=random_id())),
        make_user().token,
    ):
        for method, path in (("GET", ""), ("POST", ""), ("GET", "/1"), ("DELETE", "/1")):
            resp = client.request(
                method,
                victim.url(path),
                json={"title": "x"} if method == "POST" else None,
                headers={"Authorization": f"Bearer {token}"},
            )
            assert_problem(resp, 403)


def test_100kb_token_on_a_real_socket_is_401(live_server: LiveServer, user: ApiUser) -> None:
    """Through uvicorn too: the header is read, then refused as a token (not a 431 or 500)."""
    token = "e" * 100 * 1024
    with live_server.client() as http:
        resp = http.get(user.url(), headers={"Authorization": f"Bearer {token}"})
    assert_problem(resp, 401)


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xe9\xe9.\xe9.\xe9", b"Bearer a\x01b", "Bearer \u00a0".encode("latin-1")],
    ids=["latin-1", "control", "nbsp"],
)
def test_non_ascii_authorization_is_401(
    client: TestClient, user: ApiUser, authorization: bytes
) -> None:
    resp = client.get(
        user.url(),
        headers=[("Authorization", authorization)],  # type: ignore[arg-type]
    )
    assert_problem(resp, 401)
