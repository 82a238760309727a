"""Time limits in order: a step's own limit < Celery's soft < hard < the visibility timeout."""

from pathlib import Path

import pytest

from autowisp.config import Settings
from autowisp.errors import ConfigurationError
from workers.celery_app import celery_config


def _settings(**pipeline):
    return Settings(home=Path("/nowhere"), database_url="sqlite://", storage_root=Path("/s"),
                    pipeline=pipeline)  # fmt: skip


def test_the_visibility_timeout_outlasts_the_longest_step():
    config = celery_config(_settings(time_limit_seconds=600.0, time_limits={"calibrate": 7200}))
    soft, hard = config["task_soft_time_limit"], config["task_time_limit"]
    visibility = config["broker_transport_options"]["visibility_timeout"]
    assert 7200 < soft < hard < visibility


def test_a_visibility_timeout_shorter_than_a_step_is_refused():
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        celery_config(_settings(time_limit_seconds=3600.0, visibility_timeout=3000.0))
