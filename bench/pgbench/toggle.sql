-- PATCH /api/{user}/tasks/{id}/complete (toggle), statement for statement as the service
-- issues it (service/tasks/rules.py set_completed: the user's tag lock (shared) and the row
-- lock, then one statement from audit/append.py build_append), on a random task of a random
-- user of the write pool.
\set u random(0, :nusers - 1)
\set id :first_id + :u * :per_user + random(0, :per_user - 1)
\set n random(1, 2000000000)
BEGIN;
SELECT tasks.id, tasks.user_id, tasks.title, tasks.description, tasks.completed,
       tasks.created_at, tasks.updated_at, tasks.priority, tasks.due_at,
       (SELECT coalesce(array_agg(tags.name), '{}'::VARCHAR[])
        FROM task_tags JOIN tags ON tags.id = task_tags.tag_id
        WHERE task_tags.task_id = tasks.id) AS tags,
       tasks.recurrence, tasks.previous_task_id, tasks.next_task_id, tasks.remind_at,
       tasks.version, tasks.reminder_fired_for, tasks.reminder_fired_at, tasks.reminder_late,
       (SELECT seen.version FROM tasks AS seen WHERE seen.id = tasks.id) AS seen
FROM tasks WHERE tasks.id = :id AND tasks.user_id = 'bench-w' || :u
  AND (SELECT pg_advisory_xact_lock_shared(1952540533, hashtext('bench-w' || :u))) IS NOT NULL
FOR UPDATE OF tasks \gset o_
-- One statement: lock the chain head, update the task, hash the event in SQL, append it and
-- move the head.
WITH head AS (
  SELECT audit_chain_heads.seq AS seq, audit_chain_heads.hash AS hash FROM audit_chain_heads
  WHERE audit_chain_heads.user_id = 'bench-w' || :u::int FOR UPDATE),
change AS (
  UPDATE tasks SET completed = NOT :o_completed::boolean, updated_at = now(), version = (tasks.version + 1)
  WHERE tasks.id = :id::bigint AND tasks.user_id = 'bench-w' || :u::int
    AND EXISTS (SELECT head.seq FROM head)
  RETURNING tasks.id, tasks.user_id, tasks.title, tasks.description, tasks.completed,
            tasks.created_at, tasks.updated_at, tasks.priority, tasks.due_at,
            (SELECT coalesce(array_agg(tags.name), '{}'::VARCHAR[])
             FROM task_tags JOIN tags ON tags.id = task_tags.tag_id
             WHERE task_tags.task_id = tasks.id) AS tags,
            tasks.recurrence, tasks.previous_task_id, tasks.next_task_id, tasks.remind_at,
       tasks.version, tasks.reminder_fired_for, tasks.reminder_fired_at, tasks.reminder_late),
event AS (
  SELECT CAST('bench-w' || :u::int AS VARCHAR(128)) AS user_id,
         CAST('bench-w' || :u::int AS VARCHAR(128)) AS actor_id,
         CAST(CASE WHEN :o_completed::boolean THEN 'task.reopened' ELSE 'task.completed' END AS VARCHAR(32)) AS action, CAST('task' AS VARCHAR(32)) AS entity_type,
         CAST(:id::text AS VARCHAR(64)) AS entity_id,
         CAST(('{"id": ' || :o_id::text || ', "user_id": "' || :o_user_id::text || '", "title": "'
               || :o_title::text || '", "description": "' || :o_description::text
               || '", "completed": ' || :o_completed::boolean::text || ', "created_at": "'
               || :o_created_at::text || '", "updated_at": "' || :o_updated_at::text
               || '", "priority": "medium", "due_at": null, "tags": [], "recurrence": null, '
               || '"previous_task_id": null, "next_task_id": null, "remind_at": null}') AS JSONB) AS before,
         CAST(('{"id": ' || :o_id::text || ', "user_id": "' || :o_user_id::text || '", "title": "'
               || :o_title::text || '", "description": "' || :o_description::text
               || '", "completed": ' || (NOT :o_completed::boolean)::text || ', "created_at": "'
               || :o_created_at::text || '", "updated_at": "' || now()::text
               || '", "priority": "medium", "due_at": null, "tags": [], "recurrence": null, '
               || '"previous_task_id": null, "next_task_id": null, "remind_at": null}') AS JSONB) AS after,
         CAST(('{"completed": [' || :o_completed::boolean::text || ', ' || (NOT :o_completed::boolean)::text || ']}') AS JSONB) AS changes,
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
