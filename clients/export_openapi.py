"""Write the app's /openapi.json to a file, for the TypeScript and lint checks.

The document is fetched over ASGI from the real app; no database is needed for it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import AppEnv, Settings


def main(out: str) -> int:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        app_env=AppEnv.test,
        database_url=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        better_auth_secret="openapi-export-" + "x" * 32,
        log_level="WARNING",
    )
    # Not entered as a context manager: no lifespan, so nothing connects anywhere.
    client = TestClient(create_app(settings))
    response = client.get("/openapi.json")
    response.raise_for_status()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(response.json(), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
