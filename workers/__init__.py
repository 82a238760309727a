"""Celery entry points of the AutoWISP service: the app and thin tasks.

Start a worker with ``autowisp worker`` (or ``celery -A workers.celery_app worker``).
Tasks take a task-row id and call :func:`autowisp.pipeline.runner.run_task`; the state
lives in the database, so there is no result backend.
"""
