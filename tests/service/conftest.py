"""The distributed service for tests: real Redis, real PostgreSQL, real Celery workers.

Workers and schedulers are subprocesses started with ``autowisp worker`` and
``autowisp scheduler``, configured through the environment and a TOML file; every one is
killed at teardown. Tests that stop a server start their own (redis-server on a free
port, a throwaway PostgreSQL cluster) and leave the machine's services alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from autowisp.db.models import Configuration, Task, TaskState
from autowisp.db.session import session_scope
from tests.conftest import REPO

MACHINE_REDIS = os.environ.get("AUTOWISP_TEST_REDIS", "redis://127.0.0.1:6379")
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def broker_url(request):
    """A database number of the machine's Redis, emptied before and after."""
    client = redis.Redis.from_url(MACHINE_REDIS)
    try:
        client.ping()
    except redis.ConnectionError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {MACHINE_REDIS} is unreachable in CI: {error}")
        pytest.skip(f"Redis at {MACHINE_REDIS} is unreachable")
    number = 8 + abs(hash(request.node.nodeid)) % 7
    url = f"{MACHINE_REDIS}/{number}"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


class OwnRedis:
    """A redis-server of the test's own, on a free port, that can be stopped and started."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self._ping(), 10, "redis-server to start")

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


class OwnPostgres:
    """A throwaway PostgreSQL cluster (initdb as the postgres user) on a free port."""

    def __init__(self, directory: Path):
        if PG_BIN is None or shutil.which("runuser") is None:
            pytest.fail("PostgreSQL server binaries or runuser are missing")
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )

    def _as_postgres(self, *command: str) -> None:
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", *command], capture_output=True, text=True, cwd="/"
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.directory / "log"),
            "-o",
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")


@pytest.fixture
def own_postgres():
    # Not under pytest's tmp_path: the postgres user cannot enter root's 0700 directories.
    directory = Path(tempfile.mkdtemp(prefix="autowisp-pg-"))
    directory.chmod(0o755)
    server = OwnPostgres(directory)
    server.start()
    yield server
    try:
        server.stop()
    except RuntimeError:
        pass  # already stopped by the test
    shutil.rmtree(directory, ignore_errors=True)


class Service:
    """Scheduler and worker subprocesses of one deployment."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        broker_url: str,
        *,
        registry: str,
        steps_toml: str = "",
        lease: float = 6.0,
        queued_timeout: float = 8.0,
    ):
        self.database_url = database_url
        self.storage = tmp / "storage"
        self.config = tmp / "autowisp.toml"
        self.config.write_text(
            f"[pipeline]\nmax_attempts = 4\nbackoff_seconds = 0.2\nlease_seconds = {lease}\n"
            f'queued_timeout = {queued_timeout}\nregistry = "{registry}"\n{steps_toml}'
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOWISP_")}
        self.env.update(
            AUTOWISP_DATABASE_URL=database_url,
            AUTOWISP_BROKER_URL=broker_url,
            AUTOWISP_STORAGE_ROOT=str(self.storage),
            AUTOWISP_CONFIG=str(self.config),
            AUTOWISP_HOME=str(tmp / "home"),
            PYTHONPATH=os.pathsep.join([str(REPO), self.env.get("PYTHONPATH", "")]),
        )
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self.processes: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:  # the child keeps its own copy
            process = subprocess.Popen(
                [sys.executable, "-m", "autowisp.cli.main", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )
        self.processes.append(process)
        return process

    def worker(self, name: str, concurrency: int = 1) -> subprocess.Popen:
        return self._start(
            f"worker-{name}", "worker", "--concurrency", str(concurrency), "--name", f"{name}@%h"
        )

    def apply_configuration(self) -> None:
        """``autowisp config apply``: the deployment's file becomes the active configuration
        (the scheduler plans with the database's active configuration only)."""
        result = subprocess.run(
            [sys.executable, "-m", "autowisp.cli.main", "config", "apply"],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        if result.returncode != 0:
            raise AssertionError(f"config apply failed:\n{result.stdout}{result.stderr}")

    def scheduler(self, name: str = "scheduler", interval: float = 0.5) -> subprocess.Popen:
        self.apply_configuration()
        return self._start(name, "scheduler", "--interval", str(interval))

    def counts(self) -> dict[str, int]:
        with session_scope(self.database_url) as session:
            rows = session.execute(
                select(Task.state, func.count())
                .join(Configuration, Configuration.id == Task.configuration_id)
                .where(Configuration.active.is_(True))
                .group_by(Task.state)
            ).all()
        return {state.value: n for state, n in rows}

    def wait_finished(self, total: int, timeout: float = 180.0) -> dict[str, int]:
        def finished():
            try:
                counts = self.counts()
            except Exception:  # the database may be restarting under the test
                return None
            terminal = sum(
                counts.get(s.value, 0)
                for s in (TaskState.DONE, TaskState.DEAD, TaskState.EXCLUDED)
            )
            return counts if terminal == total else None

        try:
            return wait_for(finished, timeout, f"{total} tasks to finish", interval=0.5)
        except AssertionError as error:
            raise AssertionError(
                f"{error}; states {self.counts()}; logs:\n{self.tail()}"
            ) from None

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs.iterdir())

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILL a started process's whole group (a worker and its pool) and reap it."""
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes:
            self.kill(process)


@pytest.fixture
def service_factory(tmp_path):
    made: list[Service] = []

    def make(*args, **kwargs) -> Service:
        service = Service(tmp_path, *args, **kwargs)
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()
