"""Start-up time of `todo-api audit verify|export`: wall and CPU time of N runs, and which
parts of the web stack each command loaded.

    .venv/bin/python bench/cli_startup.py [--runs 20] [--database-url URL] [--tree DIR ...]

Each `--tree` is a source tree (e.g. `git archive <commit> | tar -x -C /tmp/old`) run with
this environment's packages, so that two commits can be compared in one run, interleaved.
CPU time (user + system, from wait4) is the figure to quote on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WEB_STACK = ("fastapi", "starlette", "httpx", "jwt", "uvicorn", "opentelemetry")
PROBE = """
import json, sys
from service.cli import main
status = main(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(json.dumps({"status": status, "loaded": loaded}), file=sys.stderr)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--tree", type=Path, action="append", help="default: this checkout")
    options = parser.parse_args()
    trees = options.tree or [REPO]
    if not options.database_url:
        parser.error("--database-url (or DATABASE_URL): a migrated database to verify/export")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        DATABASE_URL=options.database_url,
        APP_ENV="test",
        BETTER_AUTH_SECRET="cli-startup-" + "x" * 32,
        LOG_LEVEL="WARNING",
    )
    commands = [["audit", "verify"], ["audit", "export", "--format", "ndjson"]]
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    loaded: dict[tuple[str, str], str] = {}
    for _ in range(options.runs):
        for args in commands:
            for tree in trees:  # interleaved, so drift on a shared machine hits both alike
                started = time.perf_counter()
                proc = subprocess.Popen(
                    [sys.executable, "-c", PROBE % (WEB_STACK,), *args],
                    cwd=tree,
                    env={**env, "PYTHONPATH": str(tree)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                assert proc.stderr is not None
                stderr = proc.stderr.read().decode()
                _, status, usage = os.wait4(proc.pid, 0)
                wall = (time.perf_counter() - started) * 1000
                key = (str(tree), " ".join(args[:2]))
                bucket = results.setdefault(key, {"wall": [], "cpu": []})
                bucket["wall"].append(wall)
                bucket["cpu"].append((usage.ru_utime + usage.ru_stime) * 1000)
                last = stderr.strip().splitlines()[-1] if stderr.strip() else "{}"
                probe = json.loads(last) if last.startswith("{") else {"status": "?"}
                if os.waitstatus_to_exitcode(status) != 0 or probe.get("status") != 0:
                    print(f"{key}: failed: {stderr[-500:]}", file=sys.stderr)
                    return 1
                loaded[key] = ",".join(probe["loaded"]) or "none"
    header = f"{'tree':40} {'command':14} {'wall median':>11} {'CPU median':>10} {'CPU min':>8}"
    print(header + "  web stack loaded")
    for (tree, command), bucket in results.items():
        print(
            f"{tree[-40:]:40} {command:14} {statistics.median(bucket['wall']):9.0f}ms"
            f" {statistics.median(bucket['cpu']):8.0f}ms {min(bucket['cpu']):6.0f}ms"
            f"  {loaded[(tree, command)]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
