"""What the browser tests share: the API as a page on the frontend's origin calls it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from service.app import create_app
from service.database import Database
from service.settings import Settings
from tests.support import LiveServer


@pytest.fixture(scope="module")
def api(base_settings: Settings, database: Database, frontend: Any) -> Iterator[LiveServer]:
    """The service under real uvicorn, in JWKS mode for the module's `frontend` origin (it
    serves the page and plays Better Auth: `/api/auth/jwks`), on PostgreSQL."""
    settings = base_settings.model_copy(
        update={
            "better_auth_url": frontend.origin,
            "cors_origins": [frontend.origin],
            "jwks_min_refetch_seconds": 0,
            "jwks_timeout_seconds": 2,
        }
    )
    with LiveServer(create_app(settings, database)) as server:
        yield server
