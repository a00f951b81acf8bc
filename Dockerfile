# syntax=docker/dockerfile:1
# The todo-api image: runtime dependencies only (from uv.lock, without the dev group), run as a
# non-root user. Migrations are a separate step (`todo-api migrate`), run before a rollout.
#
#   docker build -t todo-api .
#   docker run --rm todo-api todo-api migrate            # with DATABASE_URL etc. set
#   docker run --rm -p 8000:8000 --stop-timeout 30 todo-api
#
# Nothing secret is baked in: every setting comes from the environment at run time, and
# .dockerignore keeps .env, the dev secret, local databases and virtualenvs out of the context.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The same uv as the Makefile's, so the image resolves exactly what uv.lock pins.
RUN python -m pip install --no-cache-dir "uv==0.13.9"
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never
WORKDIR /app
# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY alembic.ini ./
COPY alembic ./alembic
COPY service ./service
COPY audit ./audit
COPY observability ./observability
RUN uv sync --frozen --no-dev

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin app
# Same paths as in the build stage: the virtualenv points at the project in /app.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    APP_ENV=production \
    LOG_FORMAT=json \
    SHUTDOWN_DRAIN_SECONDS=5 \
    SHUTDOWN_TIMEOUT_SECONDS=20 \
    SHUTDOWN_FLUSH_SECONDS=2
# Numeric, so that Kubernetes' runAsNonRoot can check it is not root (a name, it cannot).
USER 10001:10001
EXPOSE 8000
# `todo-api serve` drains on SIGTERM: /readyz answers 503 for SHUTDOWN_DRAIN_SECONDS, then it
# stops accepting and gives in-flight requests SHUTDOWN_TIMEOUT_SECONDS to finish, then exports
# the spans and metrics it holds for at most SHUTDOWN_FLUSH_SECONDS: 27 s at most. Give the
# container at least 30 s to stop (`docker run --stop-timeout 30`, compose `stop_grace_period`).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["todo-api", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--no-migrate"]
