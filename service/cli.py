"""The `todo-api` command: serve, migrate, dev-token, audit, tasks."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from audit.cli import EXIT_DATABASE, EXIT_USAGE, UsageError, user_id_arg
from audit.cli import register as register_audit
from service.database import (
    Database,
    failure_message,
    normalize_database_url,
    refused_for_good,
    refused_startup_parameter,
    safe_url,
)
from service.limits import PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX
from service.settings import AppEnv, ConfigError, Settings, get_settings
from service.tasks import queries
from service.tasks.models import SEARCH_MAX, search_text_error
from service.tasks.queries import StatusFilter
from service.text import USER_ID_RULE, is_user_id
from service.users import EMAIL_MAX, NAME_MAX, storable

if TYPE_CHECKING:
    from alembic.config import Config

# The web stack (FastAPI, uvicorn, the token libraries, OpenTelemetry) and Alembic are
# imported by the commands that use them, so that `todo-api audit verify|export` start
# without them (tests/test_layout.py checks it).

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("service.cli")


def alembic_config(database_url: str) -> Config:
    """Alembic's configuration; its log lines go through the app's logging, not its own."""
    from alembic.config import Config

    from service.schema import MIGRATIONS

    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def migrate(settings: Settings) -> None:
    from alembic import command
    from observability.logging import configure_logging

    configure_logging(settings, exclusive=True)
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL is not set")
    log.info(
        "migrating the database to head",
        extra={"database": safe_url(normalize_database_url(settings.database_url))},
    )
    command.upgrade(alembic_config(settings.database_url), "head")


def check_requests_connect(settings: Settings) -> None:
    """Connect once as the requests will, with their connection options (migrations send
    none): a server that refuses them, as PgBouncer refuses the timeouts' startup option
    `options`, or refuses for a reason no wait cures (a wrong database, role or password),
    stops `serve` here in one line (exit 3, from `run`), instead of every request being a 503
    with no word of why. One that cannot be reached, or refuses for now (starting up, out of
    connections), is only a warning (`--no-migrate` may start before the database; stopping
    would crash-loop a rolling deploy): /readyz is 503 until it answers. So is a schema this
    release cannot run on (`service.schema`): a warning, as the migration may be under way."""
    from service.schema import schema_problem

    database = Database.from_settings(settings)
    try:
        with database.engine.connect() as connection:
            problem = schema_problem(connection)
    except DBAPIError as exc:
        if refused_startup_parameter(exc) or refused_for_good(exc):
            raise
        log.warning("the database cannot be used yet; serving anyway: %s", failure_message(exc))
        return
    finally:
        database.dispose()
    if problem is not None:
        log.warning("%s Serving anyway; /readyz is 503 until it is.", problem)


def check_can_listen(host: str, port: int, metrics: tuple[str, int] | None = None) -> None:
    """A port already taken (or not allowed) stops `serve` in one line, exit 2: uvicorn would
    exit 3, which here means "the database", with only a log line. So does METRICS_PORT
    (`metrics`: host and port), the API's included, checked while the API's is held: a worker
    that cannot take it only warns, and serves no metrics."""
    with contextlib.ExitStack() as held:
        held.enter_context(_listening(host, port, ""))
        if metrics is not None:
            held.enter_context(_listening(*metrics, " (METRICS_HOST, METRICS_PORT)"))


def _listening(host: str, port: int, what: str) -> socket.socket:
    ipv6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
    try:
        sock.bind((host, port))
        sock.listen()  # else a second socket with SO_REUSEADDR binds the same port
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ipv6 else f"{host}:{port}"
        raise UsageError(f"cannot listen on {where}{what}: {exc.strerror or exc}") from None
    return sock


# How long a worker process may take to answer uvicorn's supervisor, which pings each one
# every half second and kills one that does not answer in time. A new worker answers only
# once it has imported this package, about 2 s on an idle 2-core machine and 3-5 s on a busy
# one: at uvicorn's default of 5 s, workers starting on a loaded machine were killed, and
# their replacements too, over and over.
WORKER_HEALTHCHECK_SECONDS = 30


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.app import check_settings

    # A bad value stops here (one line from `main`), not in every worker (restarted forever).
    check_settings(settings)

    from observability.logging import configure_logging

    # Every line, uvicorn's supervisor included, is ours; each worker configures itself
    # again when it imports the app.
    configure_logging(settings, exclusive=True)
    if not args.no_migrate:
        migrate(settings)
    check_requests_connect(settings)
    if settings.metrics_enabled and args.workers > 1:
        # Counters are per process, and a scrape reaches one process: Prometheus would see
        # every counter jump between workers' values, as if reset.
        where = (
            "on METRICS_PORT, the first worker's"
            if settings.metrics_port
            else "on the API's port, the answering worker's"
        )
        log.warning(
            "METRICS_ENABLED with --workers %d: each scrape of /metrics reads one worker's "
            "counters only (%s): run one worker per container, or push the metrics with "
            "OTEL_METRICS_EXPORTER=otlp (each worker has its own service.instance.id)",
            args.workers,
            where,
        )
    metrics = None
    if settings.metrics_enabled and settings.metrics_port is not None:
        metrics = (settings.metrics_host, settings.metrics_port)
    check_can_listen(args.host, args.port, metrics)
    if settings.rate_limit_enabled and settings.redis_url is None and args.workers > 1:
        # In memory each process counts alone (the image itself runs 2 workers); said once it
        # will serve, so that a refusal above stays the one line printed.
        log.warning(
            "--workers %d without REDIS_URL: each worker counts the rate limits alone, so a "
            "client gets up to %d times each limit and RateLimit headers that jump between "
            "the workers' counts: set REDIS_URL (shared counters)",
            args.workers,
            args.workers,
        )
    if settings.needs_dev_secret:
        # Creates the secret file now, before the workers start and each reads it.
        settings.with_dev_secret()
        print(
            "Development mode without BETTER_AUTH_SECRET: tokens are signed with a generated "
            "secret kept in .todo-api-dev-secret.\n"
            "Get a token with:  .venv/bin/todo-api dev-token <user-id>",
            file=sys.stderr,
        )
    from uvicorn.config import STARTUP_FAILURE

    from service.httpserver import BoundedHttpToolsProtocol, Supervisor

    # Uvicorn raises the SIGTERM again once its graceful shutdown is done: a stop as asked, so
    # exit 0 (its supervisor of several workers does), not killed by the signal (143).
    signal.signal(signal.SIGTERM, _stopped_as_asked)
    # A Config, not uvicorn.run's keyword arguments: mypy checks each one against uvicorn's.
    config = uvicorn.Config(
        "service.app:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        # httptools, with MAX_REQUEST_HEAD_BYTES and REQUEST_HEAD_TIMEOUT_SECONDS (each worker
        # process imports the class by name and reads them from the environment).
        http=BoundedHttpToolsProtocol,
        # Client addresses from X-Forwarded-For are trusted only per TRUSTED_PROXIES.
        proxy_headers=False,
        server_header=False,
        # Logging is configured by the app (observability.logging); the access lines come
        # from its middleware, with the route, the status and the request's trace id.
        log_config=None,
        access_log=False,
        # SIGTERM: in-flight requests get this long, then the app's shutdown runs (spans are
        # flushed, the pool closed). The drain before it is service.lifecycle's.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_seconds)),
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
    )
    if args.workers > 1:
        # As uvicorn.run does for several workers, with a supervisor that stops listening
        # when it stops them (service.httpserver.Supervisor).
        Supervisor(config, sockets=[config.bind_socket()]).run()
        return 0
    # As uvicorn.run does for one: an app that cannot be imported, or a server that never
    # started (a failed startup), exits with uvicorn's STARTUP_FAILURE (3).
    config.load_app()
    server = uvicorn.Server(config)
    # Uvicorn raises a caught SIGINT again once it has shut down: Ctrl-C is a stop as asked.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else STARTUP_FAILURE


def _migrate(_args: argparse.Namespace, settings: Settings) -> int:
    migrate(settings)
    return 0


def _dev_token(args: argparse.Namespace, settings: Settings) -> int:
    from service.auth import create_dev_token

    settings = settings.with_dev_secret()
    if settings.better_auth_secret is None:
        raise UsageError("dev-token signs HS256 tokens: set BETTER_AUTH_SECRET")
    if args.user_id == settings.reminder_actor_id:
        print(
            f"todo-api: {args.user_id!r} is the service's own actor (REMINDER_ACTOR_ID): "
            "no token can be made for it",
            file=sys.stderr,
        )
        return 2
    print(
        create_dev_token(
            settings.better_auth_secret.get_secret_value(),
            args.user_id,
            email=args.email,
            name=args.name,
            ttl_seconds=args.ttl,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )
    return 0


def _list_tasks(args: argparse.Namespace, settings: Settings) -> int:
    """A user's tasks as JSON lines, through the same queries as the API."""
    db = Database.from_settings(settings)
    try:
        with db.unit_of_work() as session:
            page = queries.list_tasks(
                session,
                args.user_id,
                status=StatusFilter(args.status),
                q=args.q,
                limit=args.limit,
            )
    finally:
        db.dispose()
    for task in page.items:
        print(queries.public_json(task).decode())
    print(f"{len(page.items)} of {page.total} tasks", file=sys.stderr)
    return 0


def _int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`, said in one line if not."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _user_id(text: str) -> str:
    """The id a token is made for: one the API would serve (`service.text`)."""
    if not is_user_id(text):
        raise argparse.ArgumentTypeError(USER_ID_RULE)
    return text


def _claim(what: str, max_length: int) -> Callable[[str], str]:
    """`--email`, `--name`: what the users table can store. The API leaves any other claim
    out of the user's row, silently: the token would not do what its maker asked."""

    def parse(text: str) -> str:
        if storable(text, max_length) is None:
            raise argparse.ArgumentTypeError(
                f"{what} is at most {max_length} characters of UTF-8 text, on one line"
            )
        return text

    return parse


def _search_text(text: str) -> str:
    """`--q`: what the API takes as `q`, by the same rules (`service.tasks.models`)."""
    if len(text) > SEARCH_MAX:
        raise argparse.ArgumentTypeError(f"the search text is at most {SEARCH_MAX} characters")
    if error := search_text_error(text):
        raise argparse.ArgumentTypeError(f"the search text {error}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="todo-api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="apply migrations, then serve the API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_int_between(1, 65535), default=8000)
    serve.add_argument("--workers", type=_int_between(1, 256), default=1)
    serve.add_argument("--no-migrate", action="store_true", help="do not apply migrations first")
    serve.set_defaults(handler=_serve)

    mig = sub.add_parser("migrate", help="upgrade the database to the newest migration")
    mig.set_defaults(handler=_migrate)

    token = sub.add_parser("dev-token", help="print an HS256 token for local use")
    token.add_argument("user_id", type=_user_id)
    token.add_argument("--email", type=_claim("an email", EMAIL_MAX))
    token.add_argument("--name", type=_claim("a name", NAME_MAX))
    token.add_argument(
        "--ttl", type=_int_between(1, 366 * 86400), default=3600, help="lifetime in seconds"
    )
    token.set_defaults(handler=_dev_token, needs_database=False)
    register_audit(sub)

    task_cmd = sub.add_parser("tasks", help="read a user's tasks (operators)")
    task_sub = task_cmd.add_subparsers(dest="tasks_command", required=True)
    listing = task_sub.add_parser("list", help="print a user's tasks as JSON lines")
    listing.add_argument("user_id", type=user_id_arg)  # what is stored, as `audit --user`
    listing.add_argument("--status", choices=[s.value for s in StatusFilter], default="all")
    listing.add_argument(
        "--q", type=_search_text, help="case-insensitive search in title and description"
    )
    listing.add_argument(
        "--limit",
        type=_int_between(1, PAGE_SIZE_MAX),
        default=PAGE_SIZE_DEFAULT,
        metavar=f"1-{PAGE_SIZE_MAX}",
    )
    listing.set_defaults(handler=_list_tasks)

    return parser


def _stopped_as_asked(_signum: int, _frame: FrameType | None) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(0)


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up finish
    raise SystemExit(128 + signum)


def _hung_up(_signum: int, _frame: FrameType | None) -> None:
    """A closed terminal (SIGHUP) stops the command as SIGTERM does, gracefully and with the
    embedded server: its postmaster, in a session of its own, would outlive it."""
    os.kill(os.getpid(), signal.SIGTERM)


def _on_embedded_server(args: argparse.Namespace, settings: Settings) -> int:
    """Run the command on the embedded PostgreSQL server, stopped when the command ends."""
    from service import embedded

    # SIGTERM must unwind through the `with` below (uvicorn re-raises it after its shutdown).
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    previous_hangup = signal.signal(signal.SIGHUP, _hung_up)
    try:
        with embedded.running() as url:
            # Uvicorn's workers and Alembic read the settings from the environment.
            os.environ["DATABASE_URL"] = url
            get_settings.cache_clear()
            return int(args.handler(args, settings.model_copy(update={"database_url": url})))
    except embedded.CannotStart as exc:
        print(f"todo-api: the embedded PostgreSQL server cannot start: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    finally:
        signal.signal(signal.SIGHUP, previous_hangup)
        signal.signal(signal.SIGTERM, previous)


def describe_config_error(exc: ValueError) -> str:
    """One line: pydantic's message is several, with a documentation link per error."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        message = error["msg"].removeprefix("Value error, ")
        name = ".".join(str(part) for part in error["loc"]).upper()
        parts.append(message if not name or name in message else f"{name}: {message}")
    return "; ".join(parts)


def _reader_gone() -> int:
    """stdout's reader stopped reading (`todo-api audit verify | head -1`): end quietly, with
    the status of a process killed by SIGPIPE, not 1 (which `audit verify` means as "tampering
    found"). stdout is pointed at /dev/null so that Python's flush at exit fails no more
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run a parsed command. The failures every command reports in one line, not a traceback,
    are caught here once, for all of them."""
    try:
        # Commands that need no database say so (needs_database=False).
        if settings.database_url is None and getattr(args, "needs_database", True):
            if settings.app_env is AppEnv.production:
                # The embedded server keeps its data in the working directory: a container
                # without DATABASE_URL would acknowledge writes that its next image loses.
                raise ConfigError(
                    "APP_ENV=production needs DATABASE_URL (the embedded PostgreSQL server "
                    "is for development and tests)"
                )
            status = _on_embedded_server(args, settings)
        else:
            status = int(args.handler(args, settings))
        sys.stdout.flush()  # a reader gone is found here, not in Python's flush at exit
        return status
    except BrokenPipeError:
        return _reader_gone()
    except ConfigError as exc:
        # Found by the command itself (e.g. an unusable AUDIT_SIGNING_KEY): the same line.
        print(f"todo-api: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"todo-api: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DBAPIError as exc:
        # Unreachable, a statement cancelled, a schema never migrated: exit 3, never 1 (which
        # `audit verify` means as "tampering found").
        print(f"todo-api: {failure_message(exc)}", file=sys.stderr)
        return EXIT_DATABASE
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except (ConfigError, ValueError) as exc:
        print(f"todo-api: configuration error: {describe_config_error(exc)}", file=sys.stderr)
        return 2
    return run(args, settings)


if __name__ == "__main__":
    sys.exit(main())
