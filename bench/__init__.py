"""The benchmark harness of the todo-api service (see bench/README.md)."""
