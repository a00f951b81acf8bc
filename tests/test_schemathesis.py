"""Property-based API testing: schemathesis against the service's own /openapi.json.

Every operation, with data that fits the documented schema (positive) and data that does not
(negative), sent through the ASGI app with a valid token for the user named in the path.
Checks: no 5xx, only documented status codes and content types, bodies that match the
documented schemas, and negative data rejected. The number of examples is bounded so the test
runs in CI in well under a minute; failures print the example and a seed to reproduce.

schemathesis' own pytest loader (`schemathesis.pytest.from_fixture`) reads
`request.node._nodeid`, which pytest 9.2 no longer has, so the operations are driven here
with Hypothesis directly, through `APIOperation.as_strategy` (schemathesis' documented API).
"""

from __future__ import annotations

import re
import traceback
from collections import Counter
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import TypeAdapter, ValidationError
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from service.deps import UserIdPath
from service.tags.models import TagCreate
from service.tags.rules import TAG_NAME_MAX, TAG_NAME_PATTERN, TAGS_PER_TASK_MAX
from service.tasks.models import TITLE_PATTERN, TaskCreate
from service.text import MULTI_LINE_PATTERN, is_user_id
from tests.support import ApiUser, create_task

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
MAX_EXAMPLES = 40
# Operations whose only input is the (fixed) user id: nothing in them can be made invalid.
# (The chain verification has its `full` flag.)
NOTHING_TO_NEGATE = {
    "GET /healthz",
    "GET /readyz",
    "GET /api/{user_id}/tags",
    "GET /api/{user_id}/audit-events/proof",
    "GET /.well-known/audit-keys.json",
    "POST /api/{user_id}/events/tickets",
}


def _strategy(
    operation: APIOperation, mode: GenerationMode, user_id: str, ids: dict[str, list[int]]
) -> Any:
    """Cases for the operation; with a {task_id} or {tag_id}, half of them name one of the
    user's tasks or tags (random ids alone would almost always be a 404)."""
    strategies = [operation.as_strategy(mode, path_parameters={"user_id": user_id})]
    for name, known in ids.items():
        if f"{{{name}}}" in operation.path:
            strategies.append(
                st.sampled_from(known).flatmap(
                    lambda value, name=name: operation.as_strategy(
                        mode, path_parameters={"user_id": user_id, name: value}
                    )
                )
            )
    strategy = st.one_of(strategies)
    if mode is GenerationMode.NEGATIVE:
        strategy = strategy.filter(_not_a_string_in_disguise)
    return strategy


def _wire_text(value: Any) -> str:
    """A query value as it goes on the wire (schemathesis sends booleans as true/false)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _not_a_string_in_disguise(case: Case) -> bool:
    """Drop negative cases whose "invalid" tag reaches the server as valid text. A query
    string has only strings, and `tag=x` is a one-item array: a lone string, or a boolean or
    number alone or in a list (which schemathesis made to violate an array of strings), is
    the tag named "x", "true" or "4.5", rightly accepted when it fits the documented bounds
    (at most TAGS_PER_TASK_MAX items of at most TAG_NAME_MAX * 4 characters)."""
    value = (case.query or {}).get("tag")
    if value is None:
        return True
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, list | dict) for v in values):
        return True  # not text on the wire
    if isinstance(value, list) and all(isinstance(v, str) for v in values):
        return True  # the tag is an array of strings as generated: not in disguise
    fits = len(values) <= TAGS_PER_TASK_MAX and all(
        len(_wire_text(v)) <= TAG_NAME_MAX * 4 for v in values
    )
    return not fits


def _run(strategy: Any, statuses: Counter[int]) -> None:
    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Case) -> None:
        response = case.call_and_validate(checks=CHECKS)
        statuses[response.status_code] += 1

    check()


def test_the_api_conforms_to_its_openapi_document(
    app: FastAPI, client: TestClient, user: ApiUser
) -> None:
    task_ids = [
        create_task(
            client, user, f"seed {i}", tags=[f"tag {i % 3}"], due_at="2027-01-01T00:00:00Z"
        )["id"]
        for i in range(10)
    ]
    tag_ids = [
        tag["id"] for tag in client.get(f"/api/{user.user_id}/tags", headers=user.headers).json()
    ]
    ids = {"task_id": task_ids, "tag_id": tag_ids}
    config = schemathesis.Config.from_dict({"headers": user.headers})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    # The change feed is an endless text/event-stream: a request/response checker would wait
    # for it forever. tests/test_feed.py drives it over real HTTP, its 4xx answers included.
    operations = [
        operation
        for operation in (result.ok() for result in schema.get_all_operations())
        if operation.label != "GET /api/{user_id}/events"
    ]
    assert len(operations) >= 11, [op.label for op in operations]

    failures: list[str] = []
    unsatisfiable: set[str] = set()
    seen: dict[str, Counter[int]] = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{mode.value} {operation.label}"
            statuses = seen.setdefault(label, Counter())
            try:
                _run(_strategy(operation, mode, user.user_id, ids), statuses)
            except Unsatisfiable:
                if mode is not GenerationMode.NEGATIVE:
                    raise
                unsatisfiable.add(operation.label)
            except (Exception, BaseExceptionGroup) as exc:  # one report for every operation
                failures.append(f"{label}:\n{''.join(traceback.format_exception_only(exc))}")
    assert not failures, "\n\n".join(failures)
    assert unsatisfiable == NOTHING_TO_NEGATE
    # The run reached the operations' real work, not only their validation errors.
    for label in (
        "positive POST /api/{user_id}/tasks",
        "positive GET /api/{user_id}/tasks/{task_id}",
        "positive PUT /api/{user_id}/tasks/{task_id}",
        "positive GET /api/{user_id}/tasks/{task_id}/history",
        "positive POST /api/{user_id}/tags",
        "positive GET /api/{user_id}/tags",
        "positive GET /api/{user_id}/tags/{tag_id}",
        "positive PATCH /api/{user_id}/tags/{tag_id}",
    ):
        assert any(200 <= status < 300 for status in seen[label]), (label, seen[label])
    assert all(400 <= s < 500 for s in seen["negative POST /api/{user_id}/tasks"])


# The documented patterns say exactly what the validators accept ------------------------


# UTF-8 text: a lone surrogate is not a JSON string (RFC 8259 8.2), and pydantic refuses it.
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=12))
@settings(max_examples=400, deadline=None, database=None)
def test_documented_title_pattern_matches_the_validator(text: str) -> None:
    """OpenAPI's title and description patterns agree with what TaskCreate accepts."""
    assert (re.fullmatch(TITLE_PATTERN, text) is not None) == _accepted(title=text), repr(text)
    assert (re.fullmatch(MULTI_LINE_PATTERN, text) is not None) == _accepted(
        title="t", description=text
    ), repr(text)


@given(
    text=st.one_of(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
        # Around the trimmed bound: padding, and names of TAG_NAME_MAX - 1 to + 1 characters.
        st.builds(
            lambda pad, core, end: pad + core + end,
            st.text(alphabet=" \u3000\xa0\t", max_size=3),
            st.text(
                alphabet=st.characters(codec="utf-8"),
                min_size=TAG_NAME_MAX - 1,
                max_size=TAG_NAME_MAX + 1,
            ),
            st.text(alphabet=" \u2003\n", max_size=3),
        ),
    )
)
@settings(max_examples=400, deadline=None, database=None)
def test_documented_tag_name_pattern_matches_the_validator(text: str) -> None:
    """OpenAPI's tag name pattern (no control characters, not blank, at most TAG_NAME_MAX
    characters once trimmed) agrees with TagCreate."""
    try:
        TagCreate(name=text)
        accepted = True
    except ValidationError:
        accepted = False
    assert (re.fullmatch(TAG_NAME_PATTERN, text) is not None) == accepted, repr(text)


_USER_ID_PATH = TypeAdapter(UserIdPath)


@given(
    text=st.one_of(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
        st.sampled_from(["dave\x85", "a\x9b", " ", "\u3000", "x" * 128, "x" * 129]),
    )
)
@settings(max_examples=400, deadline=None, database=None)
def test_the_path_user_id_is_what_a_token_subject_may_be(text: str) -> None:
    """`{user_id}` (its OpenAPI pattern, validated by pydantic) and a token's `sub` (checked
    by the verifier) follow one definition, C1 controls included (service.text)."""
    try:
        _USER_ID_PATH.validate_python(text)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == is_user_id(text), repr(text)


def _accepted(**body: str) -> bool:
    try:
        TaskCreate(**body)  # type: ignore[arg-type]
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    ("text", "title", "description"),
    [
        ("a", True, True),
        (" a ", True, True),
        ("\u3000", False, True),  # blank
        ("\x1c\x1d", False, False),  # whitespace to str.strip(), but control characters
        ("\ufeff", False, True),  # invisible: blank
        ("\u200b a\u2069", True, True),  # invisible characters beside visible ones are kept
        ("\x85x", True, False),  # a title is trimmed first; C1's NEL is a control character
        ("a\x00", False, False),
        ("\t\n", False, True),
        ("\na\r", True, True),
        ("a\tb", False, True),  # one line: no tab inside
        ("a\x7f", False, False),
        ("\u200b", False, True),
        ("\u200e\u202e\u2066 \u00a0", False, True),
    ],
)
def test_documented_title_pattern_on_edge_cases(text: str, title: bool, description: bool) -> None:
    assert (re.fullmatch(TITLE_PATTERN, text) is not None) == title == _accepted(title=text)
    documented = re.fullmatch(MULTI_LINE_PATTERN, text) is not None
    assert documented == description == _accepted(title="t", description=text)
