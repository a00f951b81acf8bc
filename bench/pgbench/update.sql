-- PUT /api/{user}/tasks/{id} with a new title, statement for statement as the service issues it
-- (service/tasks.py update_task: row lock, UPDATE ... RETURNING, then record_event), on a random
-- task of a random user of the write pool. The leading SELECT 1 is SQLAlchemy's pool_pre_ping.
\set u random(0, :nusers - 1)
\set id :first_id + :u * :per_user + random(0, :per_user - 1)
\set n random(1, 2000000000)
SELECT 1;
BEGIN;
SELECT tasks.id, tasks.user_id, tasks.title, tasks.description, tasks.completed,
       tasks.created_at, tasks.updated_at, tasks.priority, tasks.due_at,
       (SELECT coalesce(array_agg(tags.name), '{}'::VARCHAR[])
        FROM task_tags JOIN tags ON tags.id = task_tags.tag_id
        WHERE task_tags.task_id = tasks.id) AS tags,
       tasks.recurrence, tasks.previous_task_id, tasks.next_task_id, tasks.version
FROM tasks WHERE tasks.id = :id AND tasks.user_id = 'bench-w' || :u FOR UPDATE OF tasks \gset o_
UPDATE tasks SET title = 'bench title ' || :n, updated_at = clock_timestamp(),
                 version = (tasks.version + 1)
WHERE tasks.id = :id
RETURNING tasks.id, tasks.user_id, tasks.title, tasks.description, tasks.completed,
          tasks.created_at, tasks.updated_at, tasks.priority, tasks.due_at,
          (SELECT coalesce(array_agg(tags.name), '{}'::VARCHAR[])
           FROM task_tags JOIN tags ON tags.id = task_tags.tag_id
           WHERE task_tags.task_id = tasks.id) AS tags,
          tasks.recurrence, tasks.previous_task_id, tasks.next_task_id, tasks.version \gset t_
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
VALUES (:h_clock_timestamp::timestamptz, 'bench-w' || :u, 'bench-w' || :u, 'task.updated',
        'task', :id::text,
        ('{"id": ' || :o_id || ', "user_id": "' || :o_user_id || '", "title": "' || :o_title
         || '", "description": "' || :o_description || '", "completed": '
         || :o_completed::boolean::text || ', "created_at": "' || :o_created_at
         || '", "updated_at": "' || :o_updated_at || '"}')::jsonb,
        ('{"id": ' || :t_id || ', "user_id": "' || :t_user_id || '", "title": "' || :t_title
         || '", "description": "' || :t_description || '", "completed": '
         || :t_completed::boolean::text || ', "created_at": "' || :t_created_at
         || '", "updated_at": "' || :t_updated_at || '"}')::jsonb,
        ('{"title": ["' || :o_title || '", "' || :t_title || '"]}')::jsonb,
        md5(:n::text), md5(:n::text || 't'), left(md5(:n::text || 's'), 16), '127.0.0.1',
        'todo-api-bench/wrk', :h_seq, :h_hash, md5(:n::text) || md5(:id::text), 2, NULL,
        txid_current())
RETURNING audit_events.id)
UPDATE audit_chain_heads SET hash = md5(:n::text) || md5(:id::text)
WHERE audit_chain_heads.user_id = 'bench-w' || :u
RETURNING (SELECT inserted.id FROM inserted) AS anon_1;
COMMIT;
