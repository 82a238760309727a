"""The Celery app. Configured lazily from AutoWISP's Settings when first used.

Reliability settings (see DESIGN.md, "Lessons from the peers' issue trackers"):
- late acknowledgement and reject on worker loss: a message is acknowledged only after
  its task ran; a killed worker's message goes back to the queue;
- prefetch 1: a worker holds no message it is not running;
- visibility timeout (Redis) longer than the longest step: an unacknowledged message is
  redelivered only after it, and the database claim makes a redelivery harmless;
- children recycled after ``max_tasks_per_child`` tasks, since numeric workers grow;
- two queues: ``light`` (per-frame steps) and ``heavy`` (night and shard steps);
- no result backend: outcomes are written to the database by the runner.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from autowisp.config import Settings

QUEUES = ("light", "heavy")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for an AutoWISP deployment."""
    pipeline = settings.pipeline
    lease = float(pipeline.get("lease_seconds", 600.0))
    time_limit = float(pipeline.get("time_limit_seconds", 3600.0))
    visibility = float(pipeline.get("visibility_timeout", time_limit + 300.0))
    return {
        "broker_url": settings.broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": int(pipeline.get("max_tasks_per_child", 200)),
        "task_time_limit": time_limit,
        "task_soft_time_limit": max(time_limit - 60.0, lease),
        "broker_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_queues": [Queue(name) for name in QUEUES],
        "task_default_queue": "light",
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


app = Celery("autowisp", include=["workers.tasks"])


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(Settings.load()))
