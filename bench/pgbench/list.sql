-- GET /api/{user}/tasks?limit=50 for a user with more tasks than one page, as the service
-- issues it (service/tasks/queries.py list_tasks): one statement, in autocommit (a read unit:
-- no BEGIN, no COMMIT), the page and, on each row, the user's running count for
-- X-Total-Count; one task more than the page says whether a next page follows.
SELECT tasks.id, tasks.user_id, tasks.title, tasks.description, tasks.completed,
       tasks.created_at, tasks.updated_at, tasks.priority, tasks.due_at,
       (SELECT coalesce(array_agg(tags.name), '{}'::VARCHAR[])
        FROM task_tags JOIN tags ON tags.id = task_tags.tag_id
        WHERE task_tags.task_id = tasks.id) AS tags,
       tasks.recurrence, tasks.previous_task_id, tasks.next_task_id, tasks.remind_at,
       tasks.version, tasks.reminder_fired_for, tasks.reminder_fired_at, tasks.reminder_late,
       (SELECT users.task_count FROM users WHERE users.id = :list_user) AS total
FROM tasks WHERE tasks.user_id = :list_user
ORDER BY tasks.created_at DESC, tasks.id DESC LIMIT 51 OFFSET 0;
