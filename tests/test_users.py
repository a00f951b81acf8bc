"""The `users` row a token's claims provision, and the per-process cache that spares a write
on every request (`service/users.py`)."""

from __future__ import annotations

import gc
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import jwt as pyjwt
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.auth import Principal, create_dev_token
from service.database import Database
from service.settings import Settings
from service.users import EMAIL_MAX, NAME_MAX, UserProvisioner
from tests.jwt_helpers import random_id
from tests.support import bearer


def _stored(database: Database, user_id: str) -> tuple[str | None, str | None]:
    with database.engine.connect() as conn:
        query = sa.text("SELECT email, name FROM users WHERE id = :id")
        email, name = conn.execute(query, {"id": user_id}).one()
    return email, name


def test_the_row_follows_every_change_of_claims_and_back(
    client: TestClient, settings: Settings, database: Database
) -> None:
    """A user renamed and renamed back: the cache must not take the old claims for current."""
    assert settings.better_auth_secret is not None
    secret, user_id = settings.better_auth_secret.get_secret_value(), random_id()
    ann, bea = ("a@example.com", "Ann"), ("b@example.com", "Bea")
    for email, name in [ann, bea, ann]:
        token = create_dev_token(secret, user_id, email=email, name=name)
        assert client.get(f"/api/{user_id}/tasks", headers=bearer(token)).status_code == 200
        assert _stored(database, user_id) == (email, name)


def _principal(i: int) -> Principal:
    user_id = f"user-{i:08d}-" + "u" * 100
    email = f"{i:08d}@" + "e" * (EMAIL_MAX - 13) + ".com"
    return Principal(user_id, email, "n" * (NAME_MAX - 8) + f"{i:08d}", expires_at=0)


def test_the_cache_keeps_neither_the_ids_nor_the_claims(database: Database) -> None:
    """An entry costs the same whatever the claims' lengths: the strings (here 634
    characters a user) are not kept, so a full cache (100,000 users) is megabytes, not 90."""
    users = UserProvisioner(database.engine)
    users.ensure(_principal(0))  # the pool and the statement's compiled form, made once
    count = 1_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        principals = [_principal(i) for i in range(1, count + 1)]
        for principal in principals:
            users.ensure(principal)
        assert all(users.is_known(principal) for principal in principals)
        del principals, principal
        gc.collect()
        kept_per_user = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert kept_per_user < 300, kept_per_user  # kept as strings, about 900 (seen)
    assert _stored(database, _principal(count).user_id) == (
        _principal(count).email,
        _principal(count).name,
    )


def test_the_cache_is_bounded(database: Database) -> None:
    users = UserProvisioner(database.engine, max_entries=2)
    principals = [_principal(i) for i in range(3)]
    for principal in principals:
        users.ensure(principal)
    assert users.is_known(principals[-1])
    assert sum(users.is_known(principal) for principal in principals) <= 2


def test_an_older_token_does_not_undo_a_rename(
    client: TestClient, settings: Settings, database: Database
) -> None:
    """A user renamed in Better Auth: another tab's token from before the rename stays valid
    for its 15 minutes. Its claims are older than the stored ones and must not replace them."""
    assert settings.better_auth_secret is not None
    secret, user_id, now = (
        settings.better_auth_secret.get_secret_value(),
        random_id(),
        int(time.time()),
    )

    def token(email: str, name: str, iat: int) -> str:
        claims = {"sub": user_id, "email": email, "name": name, "iat": iat, "exp": iat + 900}
        return pyjwt.encode(claims, secret, algorithm="HS256")

    before, after = token("a@example.com", "Ann", now - 60), token("b@example.com", "Bea", now)
    for each in (after, before):
        assert client.get(f"/api/{user_id}/tasks", headers=bearer(each)).status_code == 200
    assert _stored(database, user_id) == ("b@example.com", "Bea")


def test_an_older_token_seen_by_another_process_does_not_undo_a_rename(
    database: Database,
) -> None:
    """Each process caches what it stored: the order of the claims must hold in the row."""
    user_id = random_id()
    first, second = UserProvisioner(database.engine), UserProvisioner(database.engine)
    first.ensure(Principal(user_id, "b@example.com", "Bea", expires_at=0, issued_at=200))
    second.ensure(Principal(user_id, "a@example.com", "Ann", expires_at=0, issued_at=100))
    assert _stored(database, user_id) == ("b@example.com", "Bea")
    second.ensure(Principal(user_id, "c@example.com", "Cid", expires_at=0, issued_at=300))
    assert _stored(database, user_id) == ("c@example.com", "Cid")


def test_processes_racing_on_a_new_user_keep_the_newest_claims(database: Database) -> None:
    """A new user's first requests, with tokens of several ages, at once on several
    processes: one row, no error, and it holds the newest token's claims."""
    user_id = random_id()
    principals = [
        Principal(user_id, f"{i}@example.com", f"N{i}", expires_at=0, issued_at=1_000 + i)
        for i in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: UserProvisioner(database.engine).ensure(p), principals[::-1]))
    assert _stored(database, user_id) == ("7@example.com", "N7")
