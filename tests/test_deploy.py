"""The container image, compose file and `make run` environment, checked without a Docker engine;
and the graceful shutdown that the image's STOPSIGNAL relies on, on a real `todo-api serve`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from service.auth import create_dev_token
from service.cli import build_parser
from service.settings import Settings
from tests.jwt_helpers import random_id
from tests.reliability_helpers import wait_until
from tests.serve_helpers import ServeProcess
from tests.support import TEST_SECRET

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _instructions(name: str, stage: int = -1) -> list[str]:
    """The values of one instruction in one build stage (the last by default)."""
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    stages: list[list[dict[str, Any]]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(item)
    return [item["value"] for item in stages[stage] if item["instruction"] == name]


def _image_command() -> list[str]:
    (cmd,) = _instructions("CMD")
    parsed = json.loads(cmd)  # exec form: the server is PID 1 and gets the SIGTERM itself
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def _healthcheck() -> tuple[dict[str, str], list[str]]:
    (value,) = _instructions("HEALTHCHECK")
    options, _, command = value.partition("CMD")
    flags = dict(flag.lstrip("-").split("=", 1) for flag in shlex.split(options))
    return flags, [str(part) for part in json.loads(command)]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _instructions("ENV"):
        for pair in shlex.split(value):
            key, _, val = pair.partition("=")
            env[key] = val
    return env


def test_dockerfile_is_multi_stage_and_installs_the_lock_without_dev_tools() -> None:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    assert parser.is_multistage
    froms = [item["value"] for item in parser.structure if item["instruction"] == "FROM"]
    assert len(froms) >= 2
    syncs = [run for run in _instructions("RUN", stage=0) if "uv sync" in run]
    assert syncs, "the build stage installs with uv"
    for run in syncs:
        assert "--frozen" in run.split(), run  # exactly uv.lock, never re-resolved
        assert "--no-dev" in run.split(), run
    # The final stage copies the built environment, it does not install anything itself.
    assert not [run for run in _instructions("RUN") if "pip install" in run or "uv " in run]
    copies = _instructions("COPY")
    assert any(copy.startswith("--from=build") for copy in copies)


def test_image_runs_as_a_non_root_user_with_health_check_and_stop_signal() -> None:
    (user,) = _instructions("USER")
    assert user.split(":")[0] not in {"root", "0"}
    uid = user.split(":")[0]
    assert any("useradd" in run and f"--uid {uid} " in run for run in _instructions("RUN"))
    (stop,) = _instructions("STOPSIGNAL")
    assert stop == "SIGTERM"  # what uvicorn drains on
    flags, command = _healthcheck()
    assert "http://127.0.0.1:8000/healthz" in " ".join(command)
    assert float(flags["timeout"].rstrip("s")) <= float(flags["interval"].rstrip("s"))


def test_image_user_is_numeric_so_kubernetes_can_check_it_is_not_root() -> None:
    """With `runAsNonRoot` (the "restricted" Pod Security Standard) the kubelet refuses to
    start an image whose USER is a name: "image has non-numeric user (app), cannot verify user
    is non-root". The uid:gid of the user the image creates, then."""
    (user,) = _instructions("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), user
    assert int(uid) != 0
    (create,) = [run for run in _instructions("RUN") if "useradd" in run]
    assert f"--uid {uid} " in create and f"--gid {gid} " in create


def test_image_command_is_a_valid_serve_command_without_migrations() -> None:
    command = _image_command()
    assert command[:2] == ["todo-api", "serve"]
    args = build_parser().parse_args(command[1:])
    assert args.no_migrate  # migrations run as their own step, before a rollout
    assert args.host == "0.0.0.0"
    assert args.port == 8000


def test_image_bakes_in_no_secret_and_the_context_excludes_local_state() -> None:
    env = _image_env()
    secretish = re.compile(r"SECRET|PASSWORD|TOKEN|DATABASE_URL|REDIS_URL", re.IGNORECASE)
    assert not [key for key in env if secretish.search(key)]
    for arg in _instructions("ARG", stage=0):
        assert not secretish.search(arg.split("=")[0])
    copied = " ".join(_instructions("COPY", 0) + _instructions("COPY"))
    assert ".env" not in copied
    assert not re.search(r"(^|\s)\.\s", copied + " "), "no `COPY . .` of the whole context"
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".todo-api-dev-secret", ".todo-api-pg", "*.db", ".venv", ".git"} <= ignored


def test_shutdown_timeouts_in_the_image_are_valid_settings_within_the_grace_period() -> None:
    env = _image_env()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        shutdown_drain_seconds=env["SHUTDOWN_DRAIN_SECONDS"],
        shutdown_timeout_seconds=env["SHUTDOWN_TIMEOUT_SECONDS"],
        shutdown_flush_seconds=env["SHUTDOWN_FLUSH_SECONDS"],
    )
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    grace = compose["services"]["api"]["stop_grace_period"]
    assert grace.endswith("s")
    longest_stop = (
        settings.shutdown_drain_seconds
        + settings.shutdown_timeout_seconds
        + settings.shutdown_flush_seconds
    )
    assert longest_stop < float(grace[:-1])
    assert "--stop-timeout 30" in README
    assert "SHUTDOWN_FLUSH_SECONDS" in (ROOT / "compose.yaml").read_text()


def test_readme_says_what_the_image_runs_and_that_it_was_not_built_here() -> None:
    command = " ".join(_image_command())
    assert f"`{command}`" in README
    (user,) = _instructions("USER")
    assert f"user `{user}`" in README
    assert "`HEALTHCHECK`" in README and "`/healthz`" in README
    assert "was not built" in README


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    errors = sorted(validator.iter_errors(compose), key=str)
    assert not errors, [error.message for error in errors]
    # The schema is strict: a misspelt key is caught.
    broken = {**compose, "services": {"api": {**compose["services"]["api"], "helthcheck": {}}}}
    assert list(validator.iter_errors(broken))


def test_compose_builds_the_dockerfile_and_wires_the_services() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    api = services["api"]
    assert api["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert "dockerfile_inline" not in json.dumps(compose)
    env = api["environment"]
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert env["BETTER_AUTH_JWKS_URL"].startswith("http://host.docker.internal:")
    assert "host.docker.internal:host-gateway" in api["extra_hosts"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["todo-api", "migrate"]
    assert {"postgres", "redis", "jaeger"} <= set(services)


def test_make_run_installs_only_the_runtime_dependencies(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "--no-print-directory", "install-runtime", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (venv / "bin" / "todo-api").exists()
    assert (venv / "bin" / "uvicorn").exists()
    for dev_tool in ("pytest", "ruff", "mypy"):
        assert not (venv / "bin" / dev_tool).exists(), dev_tool
    # And `make run` uses that target, `make test` the one with the dev group.
    plan = subprocess.run(
        ["make", "-n", "-B", "run", "test", f"VENV={tmp_path / 'other'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    syncs = [line for line in plan.splitlines() if " sync " in line]
    assert any("--no-dev" in line for line in syncs)
    assert any("--no-dev" not in line for line in syncs)


@pytest.fixture
def served(database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    server = ServeProcess(
        tmp_path,
        {
            "APP_ENV": "production",
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "SHUTDOWN_DRAIN_SECONDS": "1.5",
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
        },
    ).start()
    try:
        yield server
    finally:
        server.stop()


def test_image_health_check_command_passes_against_a_running_server(served: ServeProcess) -> None:
    _, command = _healthcheck()
    command = [part.replace(":8000/", f":{served.port}/") for part in command]
    assert command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    health = httpx.get(f"{served.url}/healthz").json()
    assert health["status"] == "ok"
    assert health["version"] == "0.1.0"


def test_sigterm_drains_then_stops_within_the_timeout(served: ServeProcess) -> None:
    user_id = random_id()
    headers = {"Authorization": f"Bearer {create_dev_token(TEST_SECRET, user_id)}"}
    with httpx.Client(base_url=served.url, timeout=10) as http:
        assert http.get("/readyz").status_code == 200
        served.terminate()
        started = time.monotonic()
        # Draining: not ready, so a load balancer stops sending, but requests are still served.
        deadline = started + 1.0
        while http.get("/readyz").status_code != 503:
            assert time.monotonic() < deadline, "readyz never turned 503"
            time.sleep(0.05)
        ready = http.get("/readyz")
        assert ready.headers["content-type"] == "application/problem+json"
        assert "Retry-After" in ready.headers
        created = http.post(
            f"/api/{user_id}/tasks", json={"title": "while draining"}, headers=headers
        )
        assert created.status_code == 201
        assert time.monotonic() - started < 1.5
    code = served.wait(timeout=30)
    elapsed = time.monotonic() - started
    assert elapsed >= 1.4  # it waited out the drain period
    assert elapsed < 1.5 + 5 + 5  # drain + graceful timeout + start-up slack
    assert code in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if line.strip()]
    assert any(line["message"] == "draining before shutdown" for line in lines)


def test_sigterm_to_the_whole_process_group_still_drains(database_url: str, tmp_path: Path) -> None:
    """systemd's stop (KillMode=control-group) and `kill -TERM -PGID` signal every process of
    the group: with `--workers N` each worker gets the SIGTERM, then again from uvicorn's
    supervisor, which passes it on within half a second (its poll). The second is the same
    stop: it must not cut the drain short (it did: the workers stopped at once)."""
    server = ServeProcess(
        tmp_path,
        {
            "APP_ENV": "production",
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": TEST_SECRET,
            # Far longer than the steps below take: they all happen inside the drain.
            "SHUTDOWN_DRAIN_SECONDS": "10",
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
        },
        workers=2,
        own_process_group=True,
    ).start()
    try:
        server.terminate_group()
        wait_until(
            lambda: httpx.get(f"{server.url}/readyz", timeout=10).status_code == 503,
            "the drain to begin",
            timeout=30,
        )
        # The supervisor has sent its own SIGTERM to both workers (it waits for them once it
        # has), and they have had time to act on it: a worker that took it for "stop now"
        # closed its listener within a tenth of a second.
        wait_until(
            lambda: "Waiting for child process" in server.log.read_text(),
            "the supervisor to signal its workers",
            timeout=30,
        )
        time.sleep(2)
        for _ in range(4):  # each new connection, to either worker
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 503
        assert server.wait(timeout=60) == 0  # once the drain is over
    finally:
        server.stop()
    messages = [
        json.loads(line)["message"]
        for line in server.log.read_text().splitlines()
        if line.startswith("{")
    ]
    # Each worker drained once, and did get the second SIGTERM.
    assert messages.count("draining before shutdown") == 2
    assert messages.count("SIGTERM again: ignored, the stop under way (drain first) goes on") == 2


def test_workers_slow_to_start_are_not_killed_as_hung(database_url: str, tmp_path: Path) -> None:
    """On a busy machine a new worker takes seconds to import the app before it can answer
    uvicorn's supervisor: it is waited for, not killed and replaced over and over."""
    import os

    slow = tmp_path / "slow-start"
    slow.mkdir()
    # Each worker (a spawned process) starts 8 s late, before it can answer any ping.
    (slow / "sitecustomize.py").write_text(
        "import sys, time\nif '--multiprocessing-fork' in sys.argv:\n    time.sleep(8)\n"
    )
    path = os.pathsep.join(p for p in (str(slow), os.environ.get("PYTHONPATH")) if p)
    server = ServeProcess(
        tmp_path,
        {"DATABASE_URL": database_url, "BETTER_AUTH_SECRET": TEST_SECRET, "PYTHONPATH": path},
        workers=2,
    )
    try:
        server.start(timeout=60)
        assert server.stop() == 0
    finally:
        server.stop()
    log = server.log.read_text()
    assert "died" not in log, log[-3000:]


def _readme_prod_env() -> dict[str, str]:
    """The lines of the README's example prod.env, as `docker run --env-file` reads them."""
    intro = "For `docker run --env-file prod.env` above"
    block = re.search(r"```sh\n(.*?)```", README[README.index(intro) :], re.DOTALL)
    assert block is not None
    env: dict[str, str] = {}
    for line in block.group(1).splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("=", 1)
            assert name.isupper() and not value.startswith(("'", '"')), line  # as --env-file
            env[name] = value
    return env


def test_the_readme_prod_env_passes_the_start_up_checks(tmp_path: Path) -> None:
    """The README says its example prod.env passes as it is: `serve`'s checks (settings, then
    what the workers would build from them), run on exactly its lines and nothing else."""
    env = _readme_prod_env()
    assert env["APP_ENV"] == "production"
    check = (
        "from service.app import check_settings\n"
        "from service.settings import get_settings\n"
        "check_settings(get_settings())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,  # no .env of the working tree
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_readme_docker_run_gives_its_prod_env_the_whole_shutdown() -> None:
    """`docker run --env-file prod.env --stop-timeout T`: T must outlast that environment's
    drain + in-flight timeout + flush (the image's values where prod.env sets none), with a
    second to spare, or Docker's SIGKILL ends the stop before the in-flight requests' 503s
    and the last spans and metrics go out."""
    run = re.search(r"docker run -d --env-file prod.env .*--stop-timeout (\d+)", README)
    assert run is not None
    env = {**_image_env(), **_readme_prod_env()}
    longest_stop = sum(
        float(env[name])
        for name in ("SHUTDOWN_DRAIN_SECONDS", "SHUTDOWN_TIMEOUT_SECONDS", "SHUTDOWN_FLUSH_SECONDS")
    )
    assert longest_stop + 1 < int(run.group(1)), (longest_stop, run.group(0))
