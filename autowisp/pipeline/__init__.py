"""Pending work, dependencies, state transitions, the runner and the executors."""
