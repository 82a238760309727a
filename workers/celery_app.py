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
from autowisp.errors import ConfigurationError
from autowisp.pipeline.broker import HARD_MARGIN, SOFT_MARGIN

QUEUES = ("light", "heavy")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for an AutoWISP deployment."""
    pipeline = settings.pipeline
    policy = settings.policy()
    # The runner stops a step at its time limit; Celery's limits, just above the longest
    # one, only catch a step that ignores the alarm. A message is redelivered by Redis
    # after the visibility timeout: it must outlast the longest step, so a healthy task is
    # never delivered twice (and if it were, the database claim makes it a no-op).
    longest = max([policy.time_limit_seconds, *map(float, policy.time_limits.values())])
    hard = longest + HARD_MARGIN
    visibility = float(pipeline.get("visibility_timeout", hard + 300.0))
    if visibility <= hard:
        raise ConfigurationError(
            f"[pipeline] visibility_timeout = {visibility:g} s must exceed the longest step "
            f"time limit plus {HARD_MARGIN:g} s ({hard:g} s), or running tasks would be "
            "delivered again"
        )
    return {
        "broker_url": settings.broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": int(pipeline.get("max_tasks_per_child", 200)),
        "task_time_limit": hard,
        "task_soft_time_limit": longest + SOFT_MARGIN,
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
