"""Tags: a user's labels for tasks, their table, the link table, rules, queries and routes."""
