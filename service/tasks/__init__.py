"""Tasks, the feature: `models` (table and API shapes), `queries` (prebuilt statements and
records), `rules` (writes with their audit events), `routes` (the endpoints) and `idempotency`.

Nothing is imported here, so the CLI can read tasks without loading the web framework.
"""
