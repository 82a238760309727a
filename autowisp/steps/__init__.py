"""Processing steps: one module per step, and ``registry`` declaring the DAG in one place."""
