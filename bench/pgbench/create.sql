-- POST /api/{user}/tasks, statement for statement as the service issues it (service/tasks.py
-- create_task, service/tags/queries.py attach, audit/recorder.py record_event), for a random
-- user of the write pool: a task with a priority, a due date and two of the user's tags.
-- The leading SELECT 1 is SQLAlchemy's pool_pre_ping, sent on every connection checkout.
\set u random(0, :nusers - 1)
\set n random(1, 2000000000)
\set k random(0, 9)
SELECT 1;
BEGIN;
INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at, priority,
                   due_at, recurrence, previous_task_id, version)
VALUES ('bench-w' || :u, 'bench task ' || :n, 'created by the benchmark', false,
        clock_timestamp(), clock_timestamp(), 'medium', '2027-01-05T09:00:00Z', NULL, NULL, 1)
RETURNING tasks.id, tasks.user_id, tasks.title, tasks.description, tasks.completed,
          tasks.created_at, tasks.updated_at, tasks.priority, tasks.due_at,
          '{}'::VARCHAR[] AS tags, tasks.recurrence, tasks.previous_task_id,
          tasks.next_task_id, tasks.version \gset t_
-- The tags by name, key-share locked (a concurrent delete of the tag waits), then the links.
SELECT tags.id, tags.name FROM tags
WHERE tags.user_id = 'bench-w' || :u
  AND lower(tags.name) IN ('tag' || :k, 'tag' || ((:k + 3) % 10)) FOR KEY SHARE;
INSERT INTO task_tags (task_id, tag_id, user_id)
SELECT :t_id, tags.id, tags.user_id FROM tags
WHERE tags.user_id = 'bench-w' || :u
  AND lower(tags.name) IN ('tag' || :k, 'tag' || ((:k + 3) % 10))
ON CONFLICT DO NOTHING;
-- The chain lock: the upsert takes the head's row lock; clock_timestamp() runs after it.
INSERT INTO audit_chain_heads (user_id, seq, hash)
VALUES ('bench-w' || :u, 1, '0000000000000000000000000000000000000000000000000000000000000000')
ON CONFLICT (user_id) DO UPDATE SET seq = (audit_chain_heads.seq + 1)
RETURNING audit_chain_heads.seq, audit_chain_heads.hash, clock_timestamp() \gset h_
-- The event and the head's new hash in one statement (audit/recorder.py record_event);
-- xact_id = txid_current(): the deferred tasks_audit_guard trigger checks it at COMMIT.
WITH inserted AS (
INSERT INTO audit_events (occurred_at, user_id, actor_id, action, entity_type, entity_id,
                          before, after, changes, request_id, trace_id, span_id, client_ip,
                          user_agent, seq, prev_hash, hash, hash_version, caused_by_seq,
                          xact_id)
VALUES (:h_clock_timestamp::timestamptz, 'bench-w' || :u, 'bench-w' || :u, 'task.created',
        'task', :t_id::text, 'null'::jsonb,
        ('{"id": ' || :t_id || ', "user_id": "' || :t_user_id || '", "title": "' || :t_title
         || '", "description": "' || :t_description || '", "completed": false, "created_at": "'
         || :t_created_at || '", "updated_at": "' || :t_updated_at || '", "priority": "medium", '
         || '"due_at": "2027-01-05T09:00:00.000000Z", "tags": ["tag1", "tag4"], '
         || '"recurrence": null, "previous_task_id": null, "next_task_id": null}')::jsonb,
        ('{"title": [null, "' || :t_title || '"], "description": [null, "' || :t_description
         || '"], "completed": [null, false], "priority": [null, "medium"], "due_at": [null, '
         || '"2027-01-05T09:00:00.000000Z"], "recurrence": [null, null], "tags": [null, '
         || '["tag1", "tag4"]], "previous_task_id": [null, null], "next_task_id": [null, '
         || 'null]}')::jsonb,
        md5(:n::text), md5(:n::text || 't'), left(md5(:n::text || 's'), 16), '127.0.0.1',
        'todo-api-bench/wrk', :h_seq, :h_hash, md5(:n::text) || md5(:t_id::text), 2, NULL,
        txid_current())
RETURNING audit_events.id)
UPDATE audit_chain_heads SET hash = md5(:n::text) || md5(:t_id::text)
WHERE audit_chain_heads.user_id = 'bench-w' || :u
RETURNING (SELECT inserted.id FROM inserted) AS anon_1;
COMMIT;
