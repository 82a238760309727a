"""docker-compose.yml and deploy/: what the containers run exists and works without Docker."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml

from tests.conftest import REPO, run_cli

COMPOSE = REPO / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_declares_the_stack():
    services = _compose()["services"]
    assert set(services) == {
        "postgres",
        "redis",
        "migrate",
        "scheduler",
        "worker",
        "watcher",
        "flower",
    }
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("scheduler", "worker", "watcher"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
        assert "container_name" not in services[name]  # `--scale worker=N` needs this
        environment = services[name]["environment"]
        assert "${POSTGRES_PASSWORD:?" in environment["AUTOWISP_DATABASE_URL"]
        assert "storage:/data/storage" in services[name]["volumes"]
    assert (REPO / "deploy" / "Dockerfile").is_file()
    assert (REPO / "deploy" / "env.example").is_file()


def test_every_autowisp_command_of_the_stack_exists():
    for name, service in _compose()["services"].items():
        command = service.get("command", [])
        if command[:1] != ["autowisp"]:
            continue
        result = run_cli(*command[1:2], "--help")
        for option in (part.split("=")[0] for part in command[2:] if part.startswith("--")):
            assert option in result.stdout, f"{name}: {option} is not an option of {command}"


def test_mounted_configuration_loads(tmp_path):
    from autowisp.config import Settings

    settings = Settings.load(
        config_file=REPO / "deploy" / "autowisp.toml", environ={"AUTOWISP_HOME": str(tmp_path)}
    )
    policy = settings.policy()
    assert policy.max_attempts == 3 and policy.lease_seconds == 600.0
    from workers.celery_app import celery_config

    config = celery_config(settings)
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    # Step time limit < visibility timeout, and the lease is renewed well within it.
    assert config["task_time_limit"] < config["broker_transport_options"]["visibility_timeout"]
    assert {queue.name for queue in config["task_queues"]} == {"light", "heavy"}


def test_watch_once_retry_and_init_wait_commands(tmp_path, small_night):
    env_home = tmp_path / "home"
    upload = tmp_path / "uploads" / "night"
    upload.mkdir(parents=True)
    for frame in sorted(small_night.rglob("object_000[12].fits"))[:2]:
        shutil.copy(frame, upload / frame.name)
    environment = {"AUTOWISP_HOME": str(env_home)}
    base = [sys.executable, "-m", "autowisp.cli.main"]

    def cli(*args):
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOWISP_")}
        return subprocess.run(
            [*base, *args],
            env=env | environment,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )

    assert "at revision" in cli("init", "--wait", "5").stdout
    watched = cli("watch", str(tmp_path / "uploads"), "--once")
    assert "ingested 2 files" in watched.stdout
    assert "0 task(s) pending again" in cli("retry").stdout
