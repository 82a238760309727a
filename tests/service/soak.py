"""The soak: three nights through the service while workers are killed and servers restart.

Shared by ``tests/service/test_soak.py`` (a short run in the default suite) and
``benchmarks/bench_soak.py`` (the same code, longer). :func:`simulate_nights` writes the
nights; :func:`run_soak` runs them on a scheduler and two workers, SIGKILLing a random
worker every ``kill_interval`` seconds (its whole process group) and starting a new one,
restarting Redis once and PostgreSQL once, and ingesting late frames of the first night
after its barriers ran (so that night runs a second generation). :func:`check_soak`
then checks the database against the orchestration's invariants and the products
against a quiet run of the local executor on SQLite (:func:`local_products`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from astropy.io import fits
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from autowisp.db.migrate import upgrade
from autowisp.db.models import (
    Camera,
    Configuration,
    Image,
    ImageState,
    Night,
    NightState,
    Task,
    TaskState,
)
from autowisp.db.models import Step as StepRow
from autowisp.db.session import dispose_engine, session_scope
from autowisp.ingest.headers import sha256_of
from autowisp.ingest.ingest import ingest_paths
from autowisp.io.shards import read_shard_generation
from autowisp.pipeline.local import run_local
from autowisp.simulate.night import NightConfig, simulate_night
from autowisp.steps.registry import default_registry
from tests.products import magfit_by_star
from tests.service.conftest import OwnPostgres, OwnRedis, Service

REGISTRY = "autowisp.steps.registry:default_registry"
TERMINAL = (TaskState.DONE, TaskState.DEAD, TaskState.EXCLUDED)
#: A task interrupted this many times is not killed again (its attempts allow 12).
SPARE_AFTER = 5
NIGHT_STEPS = ("night_qc", "master_bias", "master_dark", "master_flat", "star_list", "magfit")
#: Held back from the first night and ingested after its barriers ran.
LATE = ("object_0002.fits", "bias_0010.fits", "bias_0011.fits")


@dataclass
class Nights:
    """Simulated upload directories, and the late frames held back from the first."""

    root: Path
    uploads: list[Path]
    late: list[Path]
    frames: int
    objects: int


@dataclass
class SoakReport:
    """What a soak run survived and found."""

    seconds: float = 0.0
    kills: int = 0
    kills_mid_task: int = 0
    work_seconds: float = 0.0
    worker_starts: int = 0
    redis_restarts: int = 0
    postgres_restarts: int = 0
    tasks: int = 0
    current_tasks: int = 0
    states: dict[str, int] = field(default_factory=dict)
    interrupted: int = 0
    superseded: int = 0
    duplicates: int = 0
    shared_outputs: int = 0
    compared: int = 0
    events: list[str] = field(default_factory=list, repr=False)

    def note(self, what: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {what}")

    def line(self) -> str:
        return (
            f"soak {self.seconds:.0f} s (work done after {self.work_seconds:.0f} s): "
            f"{self.kills} worker SIGKILLs survived ({self.kills_mid_task} mid-task, "
            f"{self.worker_starts} worker starts), {self.redis_restarts} Redis and "
            f"{self.postgres_restarts} PostgreSQL restarts; {self.tasks} task rows "
            f"({self.current_tasks} of current generations: {self.states}), "
            f"{self.interrupted} ran more than once, {self.superseded} superseded; "
            f"duplicates found {self.duplicates}, shared output paths {self.shared_outputs}; "
            f"{self.compared} products equal to the local executor's"
        )


def simulate_nights(
    root: Path, *, nights: int = 3, frames: int = 10, width: int = 320, height: int = 256
) -> Nights:
    """``nights`` nights of one camera each (seeds 31, 32, ...), 12 bias frames (two of
    them late), 10 darks, 10 + 2 flats and ``frames`` object frames."""
    uploads = []
    for number in range(nights):
        config = NightConfig(
            frames=frames,
            width=width,
            height=height,
            seed=31 + number,
            biases=12,
            date=f"2024-09-{10 + number:02d}",
        )
        simulate_night(root / f"n{number}", config)
        uploads.extend(sorted(p for p in (root / f"n{number}").glob("*/*") if p.is_dir()))
    late = [uploads[0] / name for name in LATE]
    total = sum(len(list(u.glob("*.fits"))) for u in uploads)
    return Nights(root, uploads, late, total, nights * frames)


def hold_back(nights: Nights) -> Path:
    """Move the late frames out of their upload directory; return where they wait."""
    holding = nights.root / "late"
    holding.mkdir(exist_ok=True)
    for path in nights.late:
        shutil.move(path, holding / path.name)
    return holding


def deliver_late(nights: Nights, holding: Path) -> None:
    for path in nights.late:
        shutil.move(holding / path.name, path)


def _key(path: str | None, serial: str, date: Any, root: Path) -> str:
    return str(Path(path).relative_to(root)) if path else f"night {serial}/{date}"


def products(url: str, root: Path) -> dict[tuple[str, str], tuple[TaskState, str | None]]:
    """(step, frame path under ``root`` or 'night SERIAL/DATE') -> (state, output) for the
    current generation of the active configuration."""
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Image.path, Camera.serial, Night.local_date, Task.state,
                   Task.output_path)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .join(Night, Night.id == Task.night_id)
            .join(Camera, Camera.id == Night.camera_id)
            .outerjoin(Image, Image.id == Task.image_id)
            .where(
                Configuration.active.is_(True),
                (Task.generation == 0) | (Task.generation == Night.closed_generation),
            )
        ).all()  # fmt: skip
    found: dict[tuple[str, str], tuple[TaskState, str | None]] = {}
    for step, path, serial, date, task_state, output in rows:
        key = (step, _key(path, serial, date, root))
        if key in found:
            raise AssertionError(f"two current-generation tasks for {key}")
        found[key] = (task_state, output)
    return found


def local_products(nights: Nights, directory: Path) -> dict:
    """The quiet reference: every frame (late ones included) ingested into SQLite and
    run by the local executor with 2 processes."""
    url = f"sqlite:///{directory / 'local.sqlite'}"
    upgrade(url)
    ingest_paths(url, nights.uploads, close=True)
    run_local(url, directory / "local-storage", default_registry(), jobs=2)
    return products(url, nights.root)


def _quiet(call: Callable[[], Any]) -> Any:
    """``call()``, or None while the database is restarting under the soak."""
    try:
        return call()
    except DBAPIError:
        return None


class Soak:
    """One soak run: the service, the servers it may restart, and what happened."""

    def __init__(
        self,
        service: Service,
        postgres: OwnPostgres,
        redis_server: OwnRedis,
        nights: Nights,
        *,
        kill_interval: float,
        seed: int = 7,
    ):
        self.service, self.postgres, self.redis = service, postgres, redis_server
        self.nights = nights
        self.url = postgres.url
        self.kill_interval = kill_interval
        self.random = random.Random(seed)
        self.report = SoakReport()
        self.workers: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def start_worker(self, slot: str) -> None:
        self.report.worker_starts += 1
        self.workers[slot] = self.service.worker(f"{slot}-{self.report.worker_starts}")

    def _killer(self) -> None:
        while not self.stop.wait(self.kill_interval * self.random.uniform(0.8, 1.2)):
            with self.lock:
                busy, spared = _quiet(self._busy_slots) or ([], [])
                idle = sorted(set(self.workers) - set(busy) - set(spared))
                if not busy and not idle:
                    continue
                slot = self.random.choice(busy or idle)
                self.report.kills_mid_task += bool(busy)
                self.report.note(f"SIGKILL {slot} (pid {self.workers[slot].pid}, busy {busy})")
                self.service.kill(self.workers[slot])
                self.report.kills += 1
                self.start_worker(slot)

    def _busy_slots(self) -> tuple[list[str], list[str]]:
        """The workers running a task now (its pool process is in the worker's group),
        and those whose task was interrupted ``SPARE_AFTER`` times already: spared, or a
        task longer than the kill interval (the last barrier of a night, which runs
        alone) would be killed on every attempt and never finish."""
        with session_scope(self.url) as session:
            rows = session.execute(
                select(Task.worker_pid, Task.attempts).where(Task.state == TaskState.RUNNING)
            ).all()
        groups: dict[int, int] = {}
        for pid, attempts in rows:
            try:
                group = os.getpgid(pid)
            except (ProcessLookupError, TypeError):
                continue
            groups[group] = max(groups.get(group, 0), int(attempts or 0))
        busy, spared = [], []
        for slot, process in sorted(self.workers.items()):
            if process.pid in groups:
                (spared if groups[process.pid] > SPARE_AFTER else busy).append(slot)
        return busy, spared

    def _barriers_done(self, night_id: int) -> bool:
        with session_scope(self.url) as session:
            done = session.scalar(
                select(func.count())
                .select_from(Task)
                .join(StepRow, StepRow.id == Task.step_id)
                .join(Configuration, Configuration.id == Task.configuration_id)
                .where(
                    Configuration.active.is_(True),
                    Task.night_id == night_id,
                    Task.generation == 1,
                    StepRow.name.in_(["night_qc", "master_bias"]),
                    Task.state == TaskState.DONE,
                )
            )
        return done == 2

    def _expected(self) -> int:
        """Tasks of the current generations once every frame is in."""
        expected = self.nights.frames + len(NIGHT_STEPS) * len(self.nights.uploads)
        return expected + 3 * self.nights.objects  # calibrate, astrometry and photometry

    def _progress(self) -> float:
        """Finished tasks (of any generation) as a fraction of the expected ones."""
        with session_scope(self.url) as session:
            finished = session.scalar(
                select(func.count()).select_from(Task).where(Task.state.in_(TERMINAL))
            )
        return finished / self._expected()

    def _not_done(self) -> list[str]:
        """The tasks neither done nor excluded: step, target, state, attempts, error."""
        with session_scope(self.url) as session:
            rows = session.execute(
                select(StepRow.name, Task.target, Task.state, Task.attempts, Task.last_error)
                .join(StepRow, StepRow.id == Task.step_id)
                .where(Task.state.not_in([TaskState.DONE, TaskState.EXCLUDED]))
            ).all()  # fmt: skip
        return [f"{n} {t} {s} after {a} attempts: {(e or '')[:300]}" for n, t, s, a, e in rows]

    def _finished(self) -> bool:
        expected = self._expected()
        with session_scope(self.url) as session:
            current = session.scalar(
                select(func.count())
                .select_from(Task)
                .join(Night, Night.id == Task.night_id)
                .where((Task.generation == 0) | (Task.generation == Night.closed_generation))
            )
            unfinished = session.scalar(
                select(func.count()).select_from(Task).where(Task.state.not_in(TERMINAL))
            )
        return current == expected and unfinished == 0

    def run(self, *, min_seconds: float, timeout: float, holding: Path) -> SoakReport:
        """Run until the work is finished, every disturbance happened and ``min_seconds``
        passed; AssertionError after ``timeout`` s."""
        with session_scope(self.url) as session:
            first_night = session.scalar(
                select(Image.night_id).where(Image.path.like(f"{self.nights.uploads[0]}/%"))
            )
        start = time.monotonic()
        for slot in ("w1", "w2"):
            self.start_worker(slot)
        self.service.scheduler()
        killer = threading.Thread(target=self._killer, name="soak-killer", daemon=True)
        killer.start()
        late_done = False
        try:
            while True:
                elapsed = time.monotonic() - start
                if elapsed > timeout:
                    raise AssertionError(
                        f"soak not finished after {timeout:.0f} s ({self.report.line()}); "
                        f"states {_quiet(self.service.counts)}; not done: "
                        f"{_quiet(self._not_done)}; logs:\n{self.service.tail()}"
                    )
                if not late_done and _quiet(lambda: self._barriers_done(first_night)):
                    deliver_late(self.nights, holding)
                    report = ingest_paths(self.url, self.nights.late, close=True)
                    if report.ingested != len(self.nights.late) or report.closed != {first_night}:
                        raise AssertionError(f"late frames not ingested and closed: {report}")
                    late_done = True
                    self.report.note("late frames ingested")
                elif not self.report.redis_restarts and (_quiet(self._progress) or 0) > 0.25:
                    self.report.note("Redis restart")
                    self.redis.stop()  # queued messages are lost: nothing kept on disk
                    time.sleep(2)
                    self.redis.start()
                    self.report.redis_restarts += 1
                elif (
                    late_done
                    and not self.report.postgres_restarts
                    and (_quiet(self._progress) or 0) > 0.6
                ):
                    self.report.note("PostgreSQL restart")
                    self.postgres.stop()  # steps running: their outcomes must not be lost
                    time.sleep(3)
                    self.postgres.start()
                    dispose_engine(self.url)
                    self.report.postgres_restarts += 1
                elif late_done and _quiet(self._finished):
                    self.report.work_seconds = self.report.work_seconds or elapsed
                    if (
                        self.report.redis_restarts
                        and self.report.postgres_restarts
                        and elapsed > min_seconds
                    ):
                        break
                time.sleep(0.5)
        finally:
            self.stop.set()
            killer.join()
        self.report.seconds = time.monotonic() - start
        return self.report


def _normalised(document: Any) -> Any:
    """A night_qc document without the database's row ids (they differ between the two
    databases: the late frames were ingested last into one of them)."""
    if isinstance(document, dict):
        return {k: _normalised(v) for k, v in document.items() if k not in ("night_id",)}
    if isinstance(document, list):
        return [_normalised(v) for v in document]
    return document


def same_datasets(a: h5py.Group, b: h5py.Group, path: str) -> None:
    """Every dataset of ``a`` (groups searched through) equals its twin in ``b``."""
    assert sorted(a) == sorted(b), path
    for name in a:
        if isinstance(a[name], h5py.Group):
            same_datasets(a[name], b[name], path)
        else:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=path)


def same_hdus(path: str, reference: str) -> None:
    """Two FITS files hold the same HDUs and data (tables column by column: a record
    array's comparison counts NaN == NaN as unequal)."""
    with fits.open(path) as a, fits.open(reference) as b:
        assert [h.name for h in a] == [h.name for h in b], path
        for ours, theirs in zip(a, b, strict=True):
            if isinstance(ours, fits.BinTableHDU):
                assert ours.columns.names == theirs.columns.names, (path, ours.name)
                for name in ours.columns.names:
                    np.testing.assert_array_equal(
                        ours.data[name], theirs.data[name], err_msg=f"{path} {name}"
                    )
            else:
                np.testing.assert_array_equal(ours.data, theirs.data, err_msg=path)


def same_product(path: str, reference: str) -> None:
    """The product at ``path`` holds the same data as ``reference`` (AssertionError)."""
    if "/magfit/" in path:
        # The star columns follow the field's star indices, given in the order the
        # nights registered their stars: the same fit, star by star.
        ours_fit, theirs_fit = magfit_by_star(path), magfit_by_star(reference)
        assert sorted(ours_fit) == sorted(theirs_fit), path
        for name, values in ours_fit.items():
            np.testing.assert_array_equal(values, theirs_fit[name], err_msg=f"{path} {name}")
    elif path.endswith(".h5"):
        with h5py.File(path) as a, h5py.File(reference) as b:
            same_datasets(a, b, path)
    elif path.endswith(".fits"):
        same_hdus(path, reference)
    else:
        ours = _normalised(json.loads(Path(path).read_text()))
        theirs = _normalised(json.loads(Path(reference).read_text()))
        assert ours == theirs, (path, reference)


def _used(path: str) -> set[str]:
    """The frames a master's HISTORY says it stacked (astropy wraps a long entry over
    several 72-character cards: a card not starting a new entry continues the last)."""
    entries: list[str] = []
    for card in fits.getheader(path).get("HISTORY", []):
        text = str(card)
        if text.startswith("used ") or not entries:
            entries.append(text)
        else:
            entries[-1] += text
    return {entry[len("used ") :] for entry in entries if entry.startswith("used ")}


def check_soak(url: str, nights: Nights, reference: dict, report: SoakReport) -> None:
    """Every invariant of the orchestration after a soak (AssertionError naming the first
    broken one), and the products against the local executor's ``reference``."""
    with session_scope(url) as session:
        names = dict(session.execute(select(StepRow.id, StepRow.name)).all())
        closed = dict(session.execute(select(Night.id, Night.closed_generation)).all())
        still_open = select(Night.id).where(Night.state != NightState.CLOSED)
        assert not session.scalars(still_open).all(), "nights left open"
        first = session.scalar(
            select(Image.night_id).where(Image.path.like(f"{nights.uploads[0]}/%"))
        )
        assert closed[first] == 2, f"the late frames' night is at generation {closed[first]}"
        assert sorted(closed.values()) == [1] * (len(closed) - 1) + [2], closed
        active = set(session.scalars(select(Configuration.id).where(Configuration.active)))
        tasks = session.scalars(select(Task).order_by(Task.id)).all()
        frames = session.execute(
            select(Image.id, Image.night_id, Image.image_type, Image.generation, Image.path)
            .where(Image.state == ImageState.INGESTED)
        ).all()  # fmt: skip
        rows = {t.id: t for t in tasks}
        keys = Counter((t.step_id, t.configuration_id, t.target, t.generation) for t in tasks)
        report.duplicates = sum(n - 1 for n in keys.values() if n > 1)
        assert report.duplicates == 0, [k for k, n in keys.items() if n > 1]
        assert all(t.configuration_id in active for t in tasks), "tasks of an old configuration"

        # A shard's or field's task works on a generation of its own: the current one
        # is its target's latest.
        latest: dict[tuple[int, str], int] = {}
        for t in tasks:
            if t.night_id is None:
                key = (t.step_id, t.target)
                latest[key] = max(latest.get(key, 0), t.generation)

        def current(task: Task) -> bool:
            if task.night_id is None:
                return task.generation == latest[(task.step_id, task.target)]
            return task.generation in (0, closed[task.night_id])

        now = [t for t in tasks if current(t)]
        per_target = Counter((t.step_id, t.target) for t in now)
        assert set(per_target.values()) == {1}, [k for k, n in per_target.items() if n > 1]
        report.tasks, report.current_tasks = len(tasks), len(now)
        report.states = dict(Counter(t.state.value for t in now))
        report.interrupted = sum(t.attempts > 1 for t in tasks)
        for task in tasks:
            where = f"task {task.id} ({names[task.step_id]} {task.target} g{task.generation})"
            if task.state is TaskState.DONE:
                continue
            assert task.state in (TaskState.DEAD, TaskState.EXCLUDED), f"{where} {task.state}"
            assert task.last_error, f"{where} is {task.state.value} without a reason"
            # An older generation's task ran (done, or dead with its reason) or was
            # excluded as superseded when the night closed again.
            report.superseded += task.last_error.startswith("superseded")
        # Output files: one task each, intact.
        rewritten: list[str] = []  # checked last, so that every other invariant is too
        outputs = Counter(t.output_path for t in tasks if t.output_path)
        report.shared_outputs = sum(n - 1 for n in outputs.values() if n > 1)
        assert report.shared_outputs == 0, [p for p, n in outputs.items() if n > 1]
        for task in tasks:
            if task.state is TaskState.DONE and task.output_path:
                path = Path(task.output_path)
                if sha256_of(path) != task.output_sha256:
                    modified = time.strftime("%H:%M:%S", time.gmtime(path.stat().st_mtime))
                    rewritten.append(
                        f"task {task.id} ({names[task.step_id]} {task.target} "
                        f"g{task.generation}, {task.attempts} attempts, finished "
                        f"{task.finished_at:%H:%M:%S} UTC): {path.name} modified {modified} UTC"
                    )
                _opens(task.output_path)
        # What each current task read: done upstream tasks of the same night and
        # generation (or the frame's own generation-0 task).
        frame_qc = {t.image_id: t.id for t in tasks if names[t.step_id] == "frame_qc"}
        by_night: dict[int, list[Any]] = {}
        for frame in frames:
            by_night.setdefault(frame.night_id, []).append(frame)
        for task in now:
            if task.state is not TaskState.DONE:
                continue
            where = f"task {task.id} ({names[task.step_id]} {task.target} g{task.generation})"
            for step, ids in (task.inputs or {}).items():
                for upstream in map(rows.__getitem__, ids):
                    assert names[upstream.step_id] == step, where
                    assert upstream.state is TaskState.DONE, (where, upstream.id)
                    if task.night_id is None:  # a shard's or field's: nights of its own
                        continue
                    assert upstream.night_id == task.night_id, (where, upstream.id)
                    assert upstream.generation in (0, task.generation), (where, upstream.id)
            if names[task.step_id] == "lightcurves":
                # The shard's current file holds every night at its closed generation.
                held = read_shard_generation(Path(task.output_path), columns=False).nights
                assert {n: b.night_generation for n, b in held.items()} == {
                    n: closed[n] for n in held
                }, where
                assert held, f"{where} holds no night"
            if names[task.step_id] == "night_qc":
                night_frames = [f for f in by_night[task.night_id] if f.generation <= closed[
                    task.night_id]]  # fmt: skip
                expected = sorted(frame_qc[f.id] for f in night_frames)
                assert sorted(task.inputs["frame_qc"]) == expected, (
                    f"{where} read frame_qc of {len(task.inputs['frame_qc'])} frames, "
                    f"the night's closed generation has {len(expected)}"
                )
            if names[task.step_id] == "master_bias":
                bias = {
                    str(f.path)
                    for f in by_night[task.night_id]
                    if str(f.image_type) == "bias" and f.generation <= closed[task.night_id]
                }
                assert _used(task.output_path) == bias, f"{where} did not stack every bias"
    # The products: those of the quiet local run.
    served = products(url, nights.root)
    assert served.keys() == reference.keys(), set(served) ^ set(reference)
    for key, (task_state, path) in sorted(served.items()):
        local_state, local_path = reference[key]
        assert task_state == local_state, (key, task_state, local_state)
        # Astrometry may fail on these small frames; a frame it failed has no photometry.
        solved = served.get(("astrometry", key[1]), (TaskState.DONE, None))[0]
        if key[0] != "astrometry" and (key[0] != "photometry" or solved is TaskState.DONE):
            assert task_state is TaskState.DONE, key
        if path is None:
            continue
        same_product(path, local_path)
        if key[0].startswith("master_"):
            assert _used(path) == _used(local_path), key
        report.compared += 1
    print(report.line())
    assert not rewritten, (
        f"{len(rewritten)} outputs no longer hash to the sha256 their task recorded (written "
        f"again after the task finished): {rewritten[:5]}"
    )


def _opens(path: str) -> None:
    if path.endswith(".h5"):
        with h5py.File(path) as hdf5:
            list(hdf5)
    elif path.endswith(".fits"):
        with fits.open(path) as hdus:
            for hdu in hdus:
                _ = hdu.data
    else:
        json.loads(Path(path).read_text())


def soak(
    directory: Path,
    *,
    postgres: OwnPostgres,
    redis_server: OwnRedis,
    kill_interval: float,
    min_seconds: float,
    timeout: float,
    nights: int = 3,
    frames: int = 10,
) -> SoakReport:
    """The whole soak in ``directory``: simulate, the local reference, the disturbed
    service run, the checks; the report (AssertionError on a broken invariant)."""
    simulated = simulate_nights(directory / "sim", nights=nights, frames=frames)
    reference = local_products(simulated, directory)
    holding = hold_back(simulated)
    url = postgres.url
    upgrade(url)
    ingest_paths(url, simulated.uploads, close=True)
    (directory / "service").mkdir()
    service = Service(directory / "service", url, redis_server.url, registry=REGISTRY, lease=6.0)
    # Kills far more often than a real deployment sees: allow more attempts than 4.
    service.config.write_text(
        service.config.read_text().replace("max_attempts = 4", "max_attempts = 12")
    )
    try:
        run = Soak(service, postgres, redis_server, simulated, kill_interval=kill_interval)
        report = run.run(min_seconds=min_seconds, timeout=timeout, holding=holding)
    finally:
        service.stop()
    check_soak(url, simulated, reference, report)
    return report
