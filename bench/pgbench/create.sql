-- POST /api/{user}/tasks, statement for statement as the service issues it (service/tasks/
-- rules.py create_task: the tags resolved, then one statement from audit/append.py
-- build_append), for a random user of the write pool: a task with a priority, a due date and
-- two of the user's tags.
\set u random(0, :nusers - 1)
\set n random(1, 2000000000)
\set k random(0, 9)
BEGIN;
-- The tags by name, key-share locked, after the user's tag lock (shared; a rename or delete of
-- a tag takes it alone), in the same statement.
SELECT wanted.name AS wanted, tags.id, tags.name
FROM unnest(ARRAY['tag' || :k::int, 'tag' || ((:k::int + 3) % 10)]::TEXT[]) AS wanted(name)
JOIN tags ON tags.user_id = 'bench-w' || :u::int AND lower(tags.name) = lower(wanted.name)
WHERE (SELECT pg_advisory_xact_lock_shared(1952540533, hashtext('bench-w' || :u::int))) IS NOT NULL
FOR KEY SHARE OF tags;
-- One statement: lock the chain head, insert the task and its links, hash the event in SQL,
-- append it and move the head.
WITH head AS (
  SELECT audit_chain_heads.seq AS seq, audit_chain_heads.hash AS hash FROM audit_chain_heads
  WHERE audit_chain_heads.user_id = 'bench-w' || :u::int FOR UPDATE),
change AS (
  INSERT INTO tasks (user_id, title, description, priority, due_at, recurrence, remind_at,
                     previous_task_id, completed, created_at, updated_at, version)
  SELECT CAST('bench-w' || :u::int AS VARCHAR(128)), CAST('bench task ' || :n::int AS VARCHAR(200)),
         CAST('created by the benchmark' AS TEXT), CAST('medium' AS task_priority),
         CAST('2027-01-05T09:00:00+00:00' AS TIMESTAMPTZ), CAST(NULL AS VARCHAR(200)),
         CAST(NULL AS TIMESTAMPTZ), CAST(NULL AS BIGINT), false, CAST(now() AS TIMESTAMPTZ), CAST(now() AS TIMESTAMPTZ), 1
  FROM head
  RETURNING tasks.id, tasks.user_id, tasks.title, tasks.description, tasks.completed,
            tasks.created_at, tasks.updated_at, tasks.priority, tasks.due_at,
            '{}'::VARCHAR[] AS tags, tasks.recurrence, tasks.previous_task_id,
            tasks.next_task_id, tasks.remind_at, tasks.version, tasks.reminder_fired_for,
            tasks.reminder_fired_at, tasks.reminder_late),
event AS (
  SELECT CAST('bench-w' || :u::int AS VARCHAR(128)) AS user_id,
         CAST('bench-w' || :u::int AS VARCHAR(128)) AS actor_id,
         CAST('task.created' AS VARCHAR(32)) AS action, CAST('task' AS VARCHAR(32)) AS entity_type,
         CAST(change.id AS VARCHAR) AS entity_id, CAST('null' AS JSONB) AS before,
         CAST(('{"id": 0, "user_id": "bench-w' || :u::int || '", "title": "bench task ' || :n::int
               || '", "description": "created by the benchmark", "completed": false, '
               || '"created_at": "2026-12-04T18:28:39.693337Z", '
               || '"updated_at": "2026-12-04T18:28:39.693337Z", "priority": "medium", '
               || '"due_at": "2027-01-05T09:00:00.000000Z", "tags": ["tag1", "tag4"], '
               || '"recurrence": null, "previous_task_id": null, "next_task_id": null, '
               || '"remind_at": null}')
              AS JSONB) || jsonb_build_object('id', change.id) AS after,
         CAST(('{"title": [null, "bench task ' || :n::int || '"], "description": [null, '
               || '"created by the benchmark"], "completed": [null, false], "priority": [null, '
               || '"medium"], "due_at": [null, "2027-01-05T09:00:00.000000Z"], "tags": [null, '
               || '["tag1", "tag4"]], "recurrence": [null, null], "previous_task_id": [null, '
               || 'null], "next_task_id": [null, null], "remind_at": [null, null]}') AS JSONB)
              AS changes,
         CAST(md5(:n::text) AS VARCHAR(128)) AS request_id,
         CAST(md5(:n::text || 't') AS VARCHAR(32)) AS trace_id,
         CAST(left(md5(:n::text || 's'), 16) AS VARCHAR(16)) AS span_id,
         CAST('127.0.0.1' AS VARCHAR(64)) AS client_ip,
         CAST('todo-api-bench/wrk' AS VARCHAR(256)) AS user_agent,
         CAST(NULL AS BIGINT) AS caused_by_seq, head.seq + 1 AS seq, head.hash AS prev_hash,
         clock_timestamp() AS occurred_at
  FROM head JOIN change ON true),
signed AS (
  SELECT event.*, encode(sha256(convert_to(CAST(jsonb_build_object(
           'user_id', event.user_id, 'seq', event.seq, 'prev_hash', event.prev_hash,
           -- chr(58) is the colon, which pgbench would read as a variable's start here
           'occurred_at', to_char(timezone('UTC', event.occurred_at),
                                  'YYYY-MM-DD"T"HH24' || chr(58) || 'MI' || chr(58) || 'SS.US"Z"'),
           'actor_id', event.actor_id, 'action', event.action,
           'entity_type', event.entity_type, 'entity_id', event.entity_id,
           'before', event.before, 'after', event.after, 'changes', event.changes,
           'request_id', event.request_id, 'trace_id', event.trace_id,
           'span_id', event.span_id, 'client_ip', event.client_ip,
           'user_agent', event.user_agent, 'caused_by_seq', event.caused_by_seq,
           'hash_version', 3) AS VARCHAR), 'UTF8')), 'hex') AS hash
  FROM event),
moved AS (
  UPDATE audit_chain_heads SET seq = signed.seq, hash = signed.hash FROM signed
  WHERE audit_chain_heads.user_id = signed.user_id),
links AS (
  INSERT INTO task_tags (task_id, tag_id, user_id)
  SELECT change.id, tags.id, change.user_id FROM change JOIN tags
    ON tags.user_id = change.user_id
   AND lower(tags.name) IN ('tag' || :k::int, 'tag' || ((:k::int + 3) % 10))),
appended AS (
  INSERT INTO audit_events (user_id, seq, prev_hash, occurred_at, actor_id, action, entity_type,
                            entity_id, before, after, changes, request_id, trace_id, span_id,
                            client_ip, user_agent, caused_by_seq, hash, hash_version, xact_id)
  SELECT signed.user_id, signed.seq, signed.prev_hash, signed.occurred_at, signed.actor_id,
         signed.action, signed.entity_type, signed.entity_id, signed.before, signed.after,
         signed.changes, signed.request_id, signed.trace_id, signed.span_id, signed.client_ip,
         signed.user_agent, signed.caused_by_seq, signed.hash, 3, txid_current()
  FROM signed RETURNING audit_events.id, audit_events.seq, audit_events.hash)
SELECT change.*, appended.id AS event_id, appended.seq AS event_seq,
       appended.hash AS event_hash
FROM appended JOIN change ON true;
COMMIT;
