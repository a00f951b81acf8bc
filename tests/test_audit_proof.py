"""`GET /api/{user_id}/audit-events/proof` and `audit.proof.verify_proof`, which a user or an
auditor runs without the server: with the public key from the well-known path and the user's
own events from the feed, and nothing of any other user."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from audit.chain import HASHED_FIELDS
from audit.checkpoint import make_checkpoint
from audit.proof import LatestProofs, verify_proof
from audit.signing import SigningKey, parse_public_keys
from service.auth import create_dev_token
from service.database import Database
from service.reminders.firing import fire_due
from service.settings import Settings
from tests.audit_helpers import change, tampering
from tests.checkpoint_helpers import KEY, World, checkpoint_world, rehash
from tests.jwt_helpers import random_id
from tests.support import TEST_SECRET, ApiUser, create_task

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def world(base_settings: Settings, tmp_path: Path) -> Iterator[World]:
    with checkpoint_world(base_settings, tmp_path) as made:
        yield made


def make_events(client: TestClient, user: Any, count: int) -> None:
    task = create_task(client, user, "Step 1")
    for n in range(2, count + 1):
        change(client, "PUT", f"/{task['id']}", user, json={"title": f"Step {n}"})


def checkpoint(db: Database) -> None:
    with db.unit_of_work() as session:
        make_checkpoint(session, KEY)


def feed(client: TestClient, user: Any) -> list[dict[str, Any]]:
    response = client.get(
        f"/api/{user.user_id}/audit-events", params={"limit": 500}, headers=user.headers
    )
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def get_proof(client: TestClient, user: Any) -> dict[str, Any]:
    response = client.get(f"/api/{user.user_id}/audit-events/proof", headers=user.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def served_keys(client: TestClient) -> Any:
    return parse_public_keys(client.get("/.well-known/audit-keys.json").text)


def test_a_proof_verifies_independently(world: World, make_user) -> None:  # type: ignore[no-untyped-def]
    users = [make_user() for _ in range(5)]
    for n, user in enumerate(users, start=1):
        make_events(world.client, user, n + 1)
    checkpoint(world.db)
    me = users[2]
    make_events(world.client, me, 2)  # events after the checkpoint do not matter
    proof = get_proof(world.client, me)
    assert (proof["user_id"], proof["seq"]) == (me.user_id, 4)
    assert proof["checkpoint"]["tree_size"] == 5
    assert proof["checkpoint"]["key_id"] == KEY.key_id
    index = sorted(u.user_id for u in users).index(me.user_id)
    assert proof["leaf_index"] == index
    # In a tree of 5 the fifth leaf hangs off the root; the others are 3 levels down.
    assert len(proof["inclusion_path"]) == (1 if index == 4 else 3)
    # Nothing of another user but hashes.
    text = json.dumps(proof)
    assert not any(u.user_id in text for u in users if u is not me)
    # Round-trip through JSON, the public key from the well-known path, the user's own feed.
    report = verify_proof(json.loads(text), served_keys(world.client), feed(world.client, me))
    assert report.ok, report
    assert (report.user_id, report.seq) == (me.user_id, 4)
    # Without the events, the proof still shows the head is in the signed checkpoint.
    assert verify_proof(proof, [KEY.public]).ok


def test_a_proof_for_a_rewritten_chain_does_not_verify(world: World, user: Any) -> None:
    make_events(world.client, user, 4)
    checkpoint(world.db)
    proof = get_proof(world.client, user)
    with tampering(world.engine) as conn:
        conn.execute(
            sa.text(
                "UPDATE audit_events SET after = jsonb_set(after, '{title}', '\"Forged\"') "
                "WHERE user_id = :u AND seq = 2"
            ),
            {"u": user.user_id},
        )
        rehash(conn, user.user_id, 2)
    events = feed(world.client, user)
    assert [e["after"]["title"] for e in events if e["seq"] == 2] == ["Forged"]
    report = verify_proof(proof, [KEY.public], events)
    assert not report.ok
    assert "rewritten" in (report.reason or "")
    # The tamperer also rewrites the stored checkpoint's leaf: the server's proof now carries
    # the forged head, which no longer leads to the signed root.
    with tampering(world.engine) as conn:
        conn.execute(sa.text("ALTER TABLE audit_checkpoints DISABLE TRIGGER USER"))
        forged_head = events[0]["hash"]
        conn.execute(
            sa.text(
                "UPDATE audit_checkpoints "
                "SET leaves = jsonb_set(leaves, '{0,2}', to_jsonb(CAST(:h AS text)))"
            ),
            {"h": forged_head},
        )
        for name in ("audit_checkpoints_append_only", "audit_checkpoints_no_truncate"):
            conn.execute(sa.text(f"ALTER TABLE audit_checkpoints ENABLE ALWAYS TRIGGER {name}"))
    # As a freshly started instance serves it (each process builds the tree once per checkpoint).
    world.client.app.state.audit_proofs = LatestProofs()  # type: ignore[attr-defined]
    forged = get_proof(world.client, user)
    assert forged["hash"] == forged_head
    report = verify_proof(forged, [KEY.public], events)
    assert not report.ok
    assert "does not lead to the signed root" in (report.reason or "")


def test_a_proof_under_another_key_does_not_verify(world: World, user: Any) -> None:
    make_events(world.client, user, 2)
    checkpoint(world.db)
    proof = get_proof(world.client, user)
    other = SigningKey.generate()
    report = verify_proof(proof, [other.public], feed(world.client, user))
    assert not report.ok and "not among the trusted public keys" in (report.reason or "")
    # Claiming the other key's id does not help: the signature is checked with that key.
    claimed = {**proof, "checkpoint": {**proof["checkpoint"], "key_id": other.key_id}}
    report = verify_proof(claimed, [other.public])
    assert not report.ok and "signature does not verify" in (report.reason or "")


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.update(seq=p["seq"] + 1),
        lambda p: p.update(leaf_index=p["leaf_index"] + 1),
        lambda p: p.update(inclusion_path=p["inclusion_path"][:-1]),
        lambda p: p.update(inclusion_path=["00" * 32, *p["inclusion_path"][1:]]),
        lambda p: p["checkpoint"].update(tree_size=p["checkpoint"]["tree_size"] + 1),
        lambda p: p.update(hash="zz"),
        lambda p: p.pop("checkpoint"),
    ],
)
def test_a_damaged_proof_does_not_verify(world: World, make_user, damage: Any) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        make_events(world.client, make_user(), 1)
    me = make_user()
    make_events(world.client, me, 2)
    checkpoint(world.db)
    proof = get_proof(world.client, me)
    assert verify_proof(proof, [KEY.public]).ok
    damage(proof)
    assert not verify_proof(proof, [KEY.public]).ok


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: e.pop("caused_by_seq"),
        lambda e: e.update(seq="two"),
        lambda e: e.update(hash_version=None),
        # What an export of an event altered to hold a number past a float's range reads back.
        lambda e: e.update(changes={"n": float("inf")}),
        # Nested within what json.loads reads, past what the hash's encoding recurses into.
        lambda e: e.update(changes=json.loads("[" * 900 + "]" * 900)),
    ],
)
def test_events_that_are_not_audit_events_are_reported_not_raised(
    world: World, user: Any, damage: Any
) -> None:
    """The events are the checker's input, as the proof is: ones that cannot be read or
    hashed make a failed report with a reason, never an exception (each was one)."""
    make_events(world.client, user, 3)
    checkpoint(world.db)
    proof = get_proof(world.client, user)
    events = feed(world.client, user)
    assert verify_proof(proof, [KEY.public], events).ok
    damage(next(e for e in events if e["seq"] == 2))
    report = verify_proof(proof, [KEY.public], events)
    assert not report.ok
    assert report.reason is not None and "seq" in report.reason


def test_proof_errors(world: World, make_user) -> None:  # type: ignore[no-untyped-def]
    me, other = make_user(), make_user()
    url = f"/api/{me.user_id}/audit-events/proof"
    assert world.client.get(url).status_code == 401
    assert world.client.get(url, headers=other.headers).status_code == 403
    response = world.client.get(url, headers=me.headers)
    assert response.status_code == 404  # no checkpoint yet
    assert response.headers["content-type"].startswith("application/problem+json")
    make_events(world.client, other, 1)
    checkpoint(world.db)
    assert world.client.get(url, headers=me.headers).status_code == 404  # not in it
    make_events(world.client, me, 1)
    assert world.client.get(url, headers=me.headers).status_code == 404  # not yet
    checkpoint(world.db)
    assert world.client.get(url, headers=me.headers).status_code == 200


# --- an auditor's own verifier, from the README alone ---------------------------------------


def readme_hashed_fields() -> set[str]:
    """The fields the README's "What is hashed" names, up to its first `;`."""
    paragraph = README.read_text(encoding="utf-8").split("**What is hashed.**", 1)[1]
    return set(re.findall(r"`([a-z_]+)`", paragraph.split(";", 1)[0]))


def readme_event_hash(event: dict[str, Any], fields: set[str]) -> str:
    """Version 3 as the README words it: keys by UTF-8 length then bytes, `", "`, `": "`."""

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
            return {k: ordered(value[k]) for k in keys}
        return [ordered(v) for v in value] if isinstance(value, list) else value

    body = ordered({name: event[name] for name in fields})
    text = json.dumps(body, separators=(", ", ": "), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def readme_proof_check(proof: dict[str, Any], jwks: dict[str, Any]) -> None:
    """Steps (1) and (2) of the README's "by hand", with the key from the well-known path."""
    (jwk,) = jwks["keys"]
    raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    cp = proof["checkpoint"]
    assert cp["key_id"] == hashlib.sha256(raw).hexdigest()[:32]
    signed = ("format", "created_at", "tree_size", "root_hash", "previous_root_hash", "key_id")
    statement = json.dumps({k: cp[k] for k in signed}, sort_keys=True, separators=(",", ":"))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(raw)
    key.verify(base64.b64decode(cp["signature"]), statement.encode("utf-8"))
    leaf = [proof["user_id"], proof["seq"], proof["hash"]]
    data = json.dumps(leaf, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    node = hashlib.sha256(b"\x00" + data).digest()
    fn, sn = proof["leaf_index"], cp["tree_size"] - 1  # RFC 9162 section 2.1.3.2
    for sibling in map(bytes.fromhex, proof["inclusion_path"]):
        assert sn > 0
        if fn % 2 == 1 or fn == sn:
            node = hashlib.sha256(b"\x01" + sibling + node).digest()
            while fn % 2 == 0 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = hashlib.sha256(b"\x01" + node + sibling).digest()
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0 and node.hex() == cp["root_hash"]


def test_a_verifier_written_from_the_readme_agrees(world: World, make_user) -> None:  # type: ignore[no-untyped-def]
    """Every kind of event, unicode (a user id too), long text, nulls and a recurring series,
    hashed and proven by what the README says, not by the project's code."""
    fields = readme_hashed_fields()
    assert fields == {*HASHED_FIELDS[3], "hash_version"}
    user_id = f"zoë-{random_id()[:20]}"
    me = ApiUser(user_id, create_dev_token(TEST_SECRET, user_id))
    others = [make_user() for _ in range(4)]
    for other in others:
        create_task(world.client, other, "Elsewhere")
    plain = create_task(world.client, me, "Plain", description=None)
    long_text = 'Zoë 🎉 "quoted" \\ back\nslash\ttab\r\u2028 </script>' * 20
    fancy = create_task(
        world.client,
        me,
        "Ünïcødé ✓ 🎉",
        description=long_text[:1000],
        priority="high",
        tags=["Zeta", "alpha", "Äbc", "ß"],
    )
    change(world.client, "PUT", f"/{plain['id']}", me, json={"title": "Plain 2"})
    change(world.client, "PATCH", f"/{plain['id']}/complete", me)
    change(world.client, "PATCH", f"/{plain['id']}/complete", me)
    series = create_task(
        world.client,
        me,
        "Every day",
        due_at="2027-01-01T09:00:00.250000+01:00",
        recurrence="FREQ=DAILY;COUNT=3",
        remind_at="2026-01-01T00:00:00Z",
    )
    assert fire_due(world.db, world.settings) == 1  # the service's reminder worker, once
    change(world.client, "PATCH", f"/{series['id']}/complete", me)
    change(world.client, "DELETE", f"/{fancy['id']}", me)
    checkpoint(world.db)
    events = feed(world.client, me)
    kinds = {e["action"] for e in events}
    assert kinds == {
        "task.created",
        "task.updated",
        "task.completed",
        "task.reopened",
        "task.deleted",
        "reminder.fired",
    }
    assert any(e["caused_by_seq"] for e in events)
    prev = "0" * 64
    for event in sorted(events, key=lambda e: e["seq"]):
        assert event["hash_version"] == 3
        assert event["prev_hash"] == prev
        assert readme_event_hash(event, fields) == event["hash"], event["action"]
        prev = event["hash"]
    proof = get_proof(world.client, me)
    assert (proof["seq"], proof["hash"]) == (max(e["seq"] for e in events), prev)
    readme_proof_check(proof, world.client.get("/.well-known/audit-keys.json").json())
