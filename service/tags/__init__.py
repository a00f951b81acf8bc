"""Tags: a user's labels for tasks, their table, the link table, rules and queries. The routes
are `service.tasks.tag_routes`: a rename or delete changes tasks, which this package never
imports."""
