"""Times every garbage collection of a benchmark server process (`bench/run.py --gc-stats`).

Put on PYTHONPATH of the servers only. It changes nothing in the service: a `gc.callbacks`
entry adds each collection's pause to a per-generation histogram, rewritten to
`$BENCH_GC_DIR/gc-<pid>.json` at most once a second (uvicorn's workers leave through
os._exit, so an atexit hook would never run). Constant work per collection.
"""

from __future__ import annotations

import bisect
import gc
import json
import os
import time

BOUNDS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)  # histogram upper bounds; last: more
_DIR = os.environ.get("BENCH_GC_DIR")
_clock = {"start": 0.0, "written": 0.0}
_stats = {
    str(gen): {"count": 0, "total_ms": 0.0, "max_ms": 0.0, "histogram": [0] * (len(BOUNDS_MS) + 1)}
    for gen in range(3)
}


def _write() -> None:
    path = os.path.join(_DIR or ".", f"gc-{os.getpid()}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump({"pid": os.getpid(), "bounds_ms": BOUNDS_MS, "generations": _stats}, fh)
    os.replace(path + ".tmp", path)


def _callback(phase: str, info: dict[str, int]) -> None:
    now = time.perf_counter()
    if phase == "start":
        _clock["start"] = now
        return
    pause = (now - _clock["start"]) * 1000
    gen = _stats[str(info.get("generation", 0))]
    gen["count"] += 1
    gen["total_ms"] += pause
    gen["max_ms"] = max(gen["max_ms"], pause)
    gen["histogram"][bisect.bisect_left(BOUNDS_MS, pause)] += 1
    if now - _clock["written"] > 1.0:
        _clock["written"] = now
        _write()


if _DIR:
    gc.callbacks.append(_callback)
