"""Summaries of a py-spy `--format raw` profile: where a request's CPU time goes.

Each raw line is `frame;frame;...;leaf count`, root first, with frames like
`function (/full/path/module.py)` (recorded with --full-filenames, so that a frame's package
is known). The harness records with `--gil`: only the thread holding the GIL is sampled, which
is where a worker's Python CPU goes (py-spy's idle detection does not work on this VM, so
without it threads blocked in a wait would count as busy).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Which component a frame belongs to, by its file; the first match wins.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("opentelemetry", "opentelemetry (tracing)"),
    ("sqlalchemy", "sqlalchemy"),
    ("psycopg2", "psycopg2"),
    ("pydantic", "pydantic"),
    ("fastapi", "fastapi"),
    ("starlette", "starlette"),
    ("uvicorn", "uvicorn"),
    ("httptools", "uvicorn"),
    ("anyio", "anyio (thread pool)"),
    ("jwt", "jwt/cryptography (auth)"),
    ("cryptography", "jwt/cryptography (auth)"),
    ("pythonjsonlogger", "logging"),
    ("logging", "logging"),
    ("json", "json"),
    ("hashlib", "hashlib"),
    ("asyncio", "asyncio"),
    ("concurrent/futures", "thread pool"),
    ("threading", "threading"),
    ("queue", "threading"),
    ("email", "stdlib other"),
    ("uuid", "stdlib other"),
    ("datetime", "stdlib other"),
)

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")
# --subprocesses prefixes each stack with its processes; their command lines may hold ';'.
_PROCESSES = re.compile(r'^(?:process \d+:"[^"]*";)+')
_SITE = re.compile(r"^.*/site-packages/|^.*/lib/python3\.\d+/")


PROJECT = ("service/", "audit/", "observability/", "bench/")

# Where a sample's time goes: walking from the leaf to the root, the first frame that matches a
# rule names the bucket. So OpenTelemetry hooks called from SQLAlchemy count as tracing, and
# json.dumps called from the audit hash counts as the audit hash.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tracing: OpenTelemetry spans, instrumentation, export", ("opentelemetry/",)),
    ("logging (JSON)", ("pythonjsonlogger/", "logging/", "observability/logging.py")),
    ("audit hash: canonical JSON + SHA-256", ("audit/chain.py",)),
    ("auth: JWT verification", ("jwt/", "cryptography/", "service/auth.py")),
    ("SQLAlchemy sql/: statements, cache keys, compile, types", ("sqlalchemy/sql/",)),
    ("SQLAlchemy engine/orm: execute, session, pool, rows", ("sqlalchemy/",)),
    ("psycopg2", ("psycopg2/",)),
    ("pydantic/SQLModel: models, validation, JSON", ("pydantic/", "pydantic_core/", "sqlmodel/")),
    ("thread-pool hand-offs (sync endpoint + deps)", ("anyio/", "threading.py", "queue.py")),
    ("FastAPI: routing, dependencies", ("fastapi/",)),
    ("Starlette: middleware, request/response", ("starlette/",)),
    (
        "uvicorn + asyncio: HTTP, event loop",
        ("uvicorn/", "httptools/", "asyncio/", "service/httpserver.py"),
    ),
    ("project code (service/, audit/, observability/)", PROJECT),
)


def bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        path = match.group("file") if match else frame
        for name, needles in BUCKETS:
            if any(path.startswith(n) or f"/{n}" in f"/{path}" for n in needles):
                return name
    return "other (stdlib)"


def component(frame: str) -> str:
    """The component of a shortened frame (see `short`)."""
    match = _FRAME.match(frame)
    path = match.group("file") if match else frame
    if path.startswith(PROJECT):
        return path.split("/", 1)[0] + " (project)"
    for needle, name in COMPONENTS:
        if needle in path:
            return name
    return "other"


def short(frame: str) -> str:
    """`func (package/module.py)`: the path after site-packages, the stdlib or the repo."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = _SITE.sub("", match.group("file"))
    for root in ("/bench/", "/service/", "/audit/", "/observability/"):
        if root in path and "site-packages" not in match.group("file"):
            path = root.lstrip("/") + path.split(root, 1)[1]
    return f"{match.group('func')} ({path})"


def _frames(stack: str) -> list[str]:
    return [short(frame) for frame in _PROCESSES.sub("", stack).split(";") if frame]


@dataclass(slots=True)
class Profile:
    samples: int
    self_by_component: Counter[str]
    incl_by_component: Counter[str]
    incl_by_function: Counter[str]
    self_by_function: Counter[str]
    buckets: Counter[str]

    def share(self, count: int) -> float:
        return count / self.samples if self.samples else 0.0


def load(path: Path) -> Profile:
    self_comp: Counter[str] = Counter()
    incl_comp: Counter[str] = Counter()
    incl_func: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        samples += count
        self_comp[component(frames[-1])] += count
        self_func[frames[-1]] += count
        buckets[bucket(frames)] += count
        for name in {component(frame) for frame in frames}:
            incl_comp[name] += count
        for frame in set(frames):
            incl_func[frame] += count
    return Profile(samples, self_comp, incl_comp, incl_func, self_func, buckets)


_RUNNERS = (
    "threading.py",
    "contextlib.py",
    "asyncio/",
    "concurrent/",
    "multiprocessing/",
    "runpy.py",
    "uvicorn/main.py",
    "uvicorn/server.py",
    "uvicorn/_subprocess.py",
    "uvicorn/supervisors/",
    "anyio/_backends/",
    "todo-api",
)


def _skip_generic(frame: str) -> bool:
    """Frames every sample passes through (thread and event-loop runners) say nothing."""
    match = _FRAME.match(frame)
    if not match:
        return True
    path = match.group("file")
    return match.group("func") == "<module>" or path.startswith(_RUNNERS)


def markdown(profile: Profile, cpu_ms_per_req: float | None, top: int = 20) -> str:
    """Tables of shares, converted to CPU-ms per request with the measured CPU per request."""

    def ms(count: int) -> str:
        if cpu_ms_per_req is None:
            return ""
        return f"{profile.share(count) * cpu_ms_per_req:.3f}"

    lines = [
        f"{profile.samples} samples holding the GIL; CPU per request (app, from /proc): "
        + (f"{cpu_ms_per_req:.2f} ms" if cpu_ms_per_req is not None else "n/a")
        + ". Each sample goes to the innermost frame that names a bucket.",
        "",
        "| where the time goes | % | ms/req |",
        "|---|---:|---:|",
    ]
    for name, count in profile.buckets.most_common():
        lines.append(f"| {name} | {100 * profile.share(count):.1f} | {ms(count)} |")
    lines += [
        "",
        "By package (self = the leaf frame; inclusive = anywhere on the stack):",
        "",
        "| package | self % | inclusive % |",
        "|---|---:|---:|",
    ]
    for name, count in profile.self_by_component.most_common():
        incl = profile.incl_by_component[name]
        lines.append(
            f"| {name} | {100 * profile.share(count):.1f} | {100 * profile.share(incl):.1f} |"
        )
    lines += [
        "",
        f"Top {top} functions by inclusive time (runners of threads and event loop left out):",
        "",
        "| function | inclusive % | ms/req |",
        "|---|---:|---:|",
    ]
    shown = 0
    for frame, count in profile.incl_by_function.most_common():
        if _skip_generic(frame):
            continue
        lines.append(f"| `{frame}` | {100 * profile.share(count):.1f} | {ms(count)} |")
        shown += 1
        if shown >= top:
            break
    lines += ["", f"Top {top // 2} functions by self time:", ""]
    lines += ["| function | self % |", "|---|---:|"]
    for frame, count in profile.self_by_function.most_common(top // 2):
        lines.append(f"| `{frame}` | {100 * profile.share(count):.1f} |")
    return "\n".join(lines)
