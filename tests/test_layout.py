"""The layout holds: import contracts, no import cycles, and an audit CLI without the web stack."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grimp

from tests.support import TEST_SECRET, ApiUser, clean_environ

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "audit", "observability")
WEB_STACK = ("fastapi", "starlette", "httpx", "jwt", "uvicorn", "opentelemetry")


def test_import_contracts_are_kept() -> None:
    """The contracts in pyproject.toml: audit never imports the task package, the plumbing
    imports no feature, the audit commands' modules import no web stack, no sibling cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache", "--no-logo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# Modules of `service` that may import the features: they wire them in.
WIRING = {"service.app", "service.cli", "service.maintenance"}
FEATURES = {"service.tasks", "service.tags", "service.events", "service.reminders"}


def test_every_service_module_is_wiring_feature_or_plumbing() -> None:
    """A new module of `service` must be classified, so that the plumbing contract covers it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (plumbing,) = [c for c in config["contracts"] if c["id"] == "plumbing-without-features"]
    classified = WIRING | FEATURES | {m for m in plumbing["source_modules"] if m != "observability"}
    graph = grimp.build_graph("service", cache_dir=None)
    top_level = {m for m in graph.modules if m.count(".") == 1}
    assert top_level == classified
    assert set(plumbing["forbidden_modules"]) >= WIRING | FEATURES | {"audit"}


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def imported_by(module: str) -> Iterator[str]:
        return iter(sorted(graph.find_modules_directly_imported_by(module) & graph.modules))

    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, imported_by(root))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle_between_modules() -> None:
    """Across all three packages, counting imports inside functions too: a module never
    imports, even indirectly, a module that imports it."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert graph.direct_import_exists(importer="service.app", imported="service.tasks.routes")
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


_PROBE = """
import json, sys
from service.cli import main
status = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"status": status, "loaded": loaded}))
"""


def _run_cli(args: list[str], database_url: str) -> dict[str, object]:
    env = clean_environ(DATABASE_URL=database_url, APP_ENV="test", BETTER_AUTH_SECRET=TEST_SECRET)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE % (WEB_STACK,), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    last: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return last


def test_audit_commands_do_not_load_the_web_stack(  # type: ignore[no-untyped-def]
    client, user: ApiUser, database_url: str, tmp_path: Path
) -> None:
    response = client.post(user.url(), json={"title": "Audited"}, headers=user.headers)
    assert response.status_code == 201

    verified = _run_cli(["audit", "verify", "--user", user.user_id], database_url)
    assert verified == {"status": 0, "loaded": []}

    export = tmp_path / "audit.ndjson"
    exported = _run_cli(
        ["audit", "export", "--user", user.user_id, "--format", "ndjson", "--output", str(export)],
        database_url,
    )
    assert exported == {"status": 0, "loaded": []}
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert [r["action"] for r in records if r["record"] == "event"] == ["task.created"]

    # The probe does see the web stack where it is loaded: `dev-token` signs with PyJWT.
    token = _run_cli(["dev-token", "someone"], database_url)
    assert token["status"] == 0
    assert "jwt" in token["loaded"]  # type: ignore[operator]


def test_test_modules_share_helpers_through_support_only() -> None:
    """No test module (nor helper) imports from a test module or from conftest: shared helpers
    live in tests/support.py and the topic helper modules."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):  # tests/browser/ too
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                last = name.rsplit(".", 1)[-1]
                if name.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                    offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert offenders == []


def _defined_names(path: Path) -> set[str]:
    """What a module itself defines: its functions, classes and assigned names, and the
    methods of its classes as `Class.method` and `method` (not what it imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names |= {item.name, f"{node.name}.{item.name}"}
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def _code_map() -> Iterator[tuple[list[str], str]]:
    """(module paths, their description) per module line of the README's code map: a line may
    name several modules (`queries.py, routes.py, schemas.py`)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Code map", 1)[1].split("```", 2)[1]
    dirs: list[str] = []
    modules: list[str] = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent >= 20:  # a description's next line
            yield modules, line.strip()
            continue
        match = re.match(r"([\w./]+(?:, [\w./]+)*)\s*(.*)", line.strip())
        if match is None:
            continue
        names, description = match.group(1).split(", "), match.group(2)
        dirs = dirs[: indent // 2]
        if names[0].endswith("/"):
            dirs.append(names[0])
            modules = []
        else:
            modules = ["".join(dirs) + name for name in names]
            yield modules, description


def test_the_readme_code_map_names_modules_and_functions_that_exist() -> None:
    """Every module the code map names exists, and a function it names with `()` is defined
    in that module, not merely imported there: names move (every_route left errors.py)."""
    missing = []
    checked = 0
    for modules, description in _code_map():
        missing += [module for module in modules if not (REPO / module).is_file()]
        defined = set().union(*(_defined_names(REPO / m) for m in modules if (REPO / m).is_file()))
        for name in re.findall(r"([A-Za-z_][\w.]*)\(\)", description):
            checked += 1
            if name not in defined:
                missing.append(f"{', '.join(modules) or '?'}: {name}()")
    assert checked > 5
    assert missing == []


def test_the_readme_names_functions_where_they_are_defined() -> None:
    """ "`name` in `path.py`" and "`path.py` `name`" in the READMEs: defined in that file."""
    pairs = []
    for readme in (REPO / "README.md", REPO / "bench" / "README.md"):
        text = readme.read_text(encoding="utf-8")
        pairs += re.findall(r"`([A-Za-z_][\w.]*)` in `([\w/]+\.py)`", text)
        pairs += [(n, p) for p, n in re.findall(r"`([\w/]+\.py)` `([A-Za-z_][\w.]*)`", text)]
    assert len(pairs) > 10
    missing = [f"{path}: {name}" for name, path in pairs if name not in _defined_names(REPO / path)]
    assert missing == []
