#!/usr/bin/env bash
# Prints the SQL the service sends for one create, update, toggle and list, so that
# bench/pgbench/*.sql can be checked against it after service/tasks/queries.py or
# audit/append.py change. Uses a scratch database (CAPTURE_DB, default todo_sql_capture: give
# each person their own on a shared server) with log_statement = 'all' and reads PostgreSQL's
# log, which needs read access to it.
#   bash bench/capture-sql.sh [postgres-log-file]
set -euo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-/var/log/postgresql/postgresql-15-main.log}
DB=${CAPTURE_DB:-todo_sql_capture}
PG="psql -qAt -h 127.0.0.1 -U postgres"
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$PG -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
export APP_ENV=production OTEL_SDK_DISABLED=true
export BETTER_AUTH_SECRET=capture-secret-0123456789abcdefghijklmnopqrstuvwxyz
export DATABASE_URL=postgresql://postgres@127.0.0.1:5432/$DB
.venv/bin/todo-api migrate >/dev/null 2>&1
$PG -c "ALTER DATABASE $DB SET log_statement = 'all'"
.venv/bin/todo-api serve --no-migrate --workers 1 --port "$PORT" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; sleep 1; $PG -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
for _ in $(seq 60); do curl -sf "localhost:$PORT/healthz" >/dev/null && break; sleep 0.5; done
TOKEN=$(.venv/bin/todo-api dev-token alice 2>/dev/null)
api() { curl -s -o /dev/null -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' "$@"; }
api -X POST -d '{"title":"first","description":"d"}' "localhost:$PORT/api/alice/tasks"  # provisions
show() {
  local before; before=$(wc -l <"$LOG")
  shift; api "$@"; sleep 0.3
  tail -n +"$((before + 1))" "$LOG" | grep -v '^\s*$' | sed -E "s/^.*$DB LOG:  statement: /  /"
}
echo "== create";  show create -X POST -d '{"title":"second","description":"d","priority":"medium","due_at":"2027-01-05T09:00:00Z","tags":["tag1","tag4"]}' "localhost:$PORT/api/alice/tasks"
echo "== update";  show update -X PUT -d '{"title":"renamed"}' "localhost:$PORT/api/alice/tasks/1"
echo "== toggle";  show toggle -X PATCH "localhost:$PORT/api/alice/tasks/1/complete"
echo "== list";    show list "localhost:$PORT/api/alice/tasks?limit=1"
