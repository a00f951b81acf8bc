"""Creating a user row, or refreshing its email and name, when a token's user is first seen."""

from __future__ import annotations

import threading

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert

from service.auth import Principal
from service.models import EMAIL_MAX, NAME_MAX, User

USERS = User.__table__  # type: ignore[attr-defined]


def _fits(value: str | None, max_length: int) -> str | None:
    return value if value is not None and len(value) <= max_length and "\x00" not in value else None


def _storable_claims(principal: Principal) -> tuple[str | None, str | None]:
    """Email and name as the users table can hold them: one that cannot is left out (no 500)."""
    return _fits(principal.email, EMAIL_MAX), _fits(principal.name, NAME_MAX)


class UserProvisioner:
    """Writes a user row only when this process sees new claims, not on every request.

    The upsert runs in its own short transaction, so a request that later rolls back cannot
    leave the cache believing in a row that was never committed.
    """

    def __init__(self, engine: Engine, max_entries: int = 100_000) -> None:
        self._engine = engine
        self._seen: dict[str, tuple[str | None, str | None]] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def is_known(self, principal: Principal) -> bool:
        """True when this process already stored these claims: `ensure` would do nothing."""
        return self._seen.get(principal.user_id) == _storable_claims(principal)

    def ensure(self, principal: Principal) -> None:
        if self.is_known(principal):
            return
        claims = email, name = _storable_claims(principal)
        values = {"id": principal.user_id, "email": email, "name": name}
        stmt = insert(USERS).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[USERS.c.id],
            set_={"email": stmt.excluded.email, "name": stmt.excluded.name},
        )
        with self._engine.begin() as conn:
            conn.execute(stmt)
        with self._lock:
            if len(self._seen) >= self._max_entries:
                self._seen.clear()
            self._seen[principal.user_id] = claims
