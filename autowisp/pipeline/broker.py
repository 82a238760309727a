"""Publishing task messages to the Celery broker, without importing the worker code.

The scheduler only needs to send ``autowisp.run_task`` messages by name; the workers
(``workers/``) define what the task does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

from celery import Celery
from kombu import Queue
from kombu.utils.uuid import uuid

from autowisp.pipeline.scheduler import Publisher

__all__ = ["TASK_NAME", "celery_publisher"]

TASK_NAME = "autowisp.run_task"

#: Seconds past a step's own time limit at which Celery's soft and hard limits strike.
SOFT_MARGIN = 30.0
HARD_MARGIN = 90.0

log = logging.getLogger(__name__)


def celery_publisher(broker_url: str) -> Publisher:
    """A publisher that sends one message per task over a pooled broker connection."""
    client = Celery("autowisp-scheduler", broker=broker_url, set_as_current=False)
    client.conf.update(
        task_serializer="json",
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        result_backend=None,
    )

    amqp = client.amqp

    class CeleryPublisher:
        """Calling it publishes; ``depth(queue)`` counts the messages waiting there."""

        def __call__(self, messages: Sequence[tuple[int, str, float]]) -> None:
            publish(messages)

        def depth(self, queue: str) -> int | None:
            try:
                with client.connection_or_acquire() as connection:
                    _, count, _ = connection.default_channel.queue_declare(queue, passive=True)
                return int(count)
            except Exception as error:  # an unknown queue or a broker hiccup
                if "NOT_FOUND" in str(error) or type(error).__name__ == "NotFound":
                    return 0  # never declared: nothing waits there
                log.warning("cannot count the messages of queue %r: %s", queue, error)
                return None

    def publish(messages: Sequence[tuple[int, str, float]]) -> None:
        if not messages:
            return
        declared: set[str] = set()
        with client.producer_or_acquire() as producer:
            # kombu's publish batches pipeline the Redis commands (one round trip per
            # 1,000 messages); older kombu, or another broker, publishes one by one.
            # Messages are built once with Celery's own protocol (create_task_message)
            # and sent straight to the queue, skipping send_task's per-call routing:
            # about 3x faster. No kombu-level retry (it disables batching): on failure
            # the scheduler gives the rows back and publishes them on its next cycle.
            batch = getattr(producer, "batch", None)
            with batch(max_size=1000) if batch is not None else nullcontext():
                for task_id, queue, limit in messages:
                    # The step's time limit travels with the task: the runner stops the
                    # step at ``limit`` (a transient failure); Celery's soft and hard
                    # limits just above it catch a step that ignores the runner's alarm.
                    message = amqp.create_task_message(
                        uuid(),
                        TASK_NAME,
                        (task_id,),
                        {"time_limit": limit},
                        time_limit=limit + HARD_MARGIN,
                        soft_time_limit=limit + SOFT_MARGIN,
                    )
                    producer.publish(
                        message.body,
                        exchange="",
                        routing_key=queue,
                        headers=message.headers,
                        serializer="json",
                        declare=None if queue in declared else [Queue(queue)],
                        **message.properties,
                    )
                    declared.add(queue)

    return CeleryPublisher()
