"""``autowisp scheduler | worker | watch``: the distributed service's processes."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from autowisp.cli.pipeline import _settings, do_ingest, ensure_schema, file_versions
from autowisp.config import Settings
from autowisp.db.session import session_scope
from autowisp.pipeline.configuration import configuration_drift
from autowisp.pipeline.cycle import field_radius, night_quiet_seconds
from autowisp.pipeline.scheduler import CycleReport, run_scheduler
from autowisp.steps.registry import load_registry


def warn_about_drift(settings: Settings) -> None:
    """Say so when the configuration file is not the database's active configuration
    (the service runs the active one; `autowisp config apply` changes it)."""
    registry, versions = file_versions(settings)
    with session_scope(settings.database_url) as session:
        drift = configuration_drift(session, registry, versions)
    if drift:
        typer.echo(
            f"the configuration file differs from the active configuration for "
            f"{', '.join(drift)}: the active one is used (`autowisp config apply` activates "
            "the file's)",
            err=True,
        )


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def scheduler(
    once: Annotated[bool, typer.Option("--once", help="One cycle, then exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between cycles.")] = 5.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="Do not print each cycle.")] = False,
) -> None:
    """Enqueue every pending task whose inputs are done; requeue tasks of dead workers."""
    from autowisp.pipeline.broker import celery_publisher

    settings = _settings()
    _logging(not quiet)
    ensure_schema(settings)

    def report(cycle: CycleReport) -> None:
        if not quiet and (cycle.enqueued or cycle.created or cycle.swept or cycle.requeued):
            typer.echo(
                f"created {cycle.created}, enqueued {cycle.enqueued}, "
                f"lease-expired {cycle.swept}, retried {cycle.retried}, "
                f"requeued {cycle.requeued}, closed nights {cycle.closed}, "
                f"excluded {cycle.excluded}, "
                f"waiting {cycle.pending_waiting}"
            )

    warn_about_drift(settings)
    run_scheduler(
        settings.database_url,
        load_registry(settings.registry_spec),
        celery_publisher(settings.broker_url),
        policy=settings.policy(),
        queued_timeout=float(settings.pipeline.get("queued_timeout", 600.0)),
        night_quiet_seconds=night_quiet_seconds(settings),
        field_radius=field_radius(settings),
        interval=interval,
        once=once,
        report=report,
    )


def worker(
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    queues: Annotated[str, typer.Option(help="Queues to consume, comma-separated.")] = (
        "light,heavy"
    ),
    name: Annotated[str, typer.Option(help="Worker node name.")] = "autowisp@%h",
    pool: Annotated[str, typer.Option(help="Celery pool: prefork or solo.")] = "prefork",
) -> None:
    """Start a Celery worker that runs tasks (replaces this process)."""
    settings = _settings()
    ensure_schema(settings)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        f"--hostname={name}",
        f"--pool={pool}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    os.execv(sys.executable, argv)


def watch(
    upload_dir: Annotated[Path, typer.Argument(help="Directory observers upload into.")],
    quiet_seconds: Annotated[
        float | None, typer.Option(help="Quiet time before ingest, s.")
    ] = None,
    rescan_seconds: Annotated[float | None, typer.Option(help="Periodic rescan, s.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Scan once, then exit.")] = False,
) -> None:
    """Ingest each uploaded night once its files have stopped changing, then plan its tasks."""
    from autowisp.ingest.watch import UploadWatcher

    settings = _settings()
    _logging(True)
    if not upload_dir.is_dir():
        raise typer.BadParameter(f"{upload_dir} is not a directory")
    ensure_schema(settings)
    quiet = (
        quiet_seconds
        if quiet_seconds is not None
        else float(settings.watch.get("quiet_seconds", 60.0))
    )
    rescan = (
        rescan_seconds
        if rescan_seconds is not None
        else float(settings.watch.get("rescan_seconds", 30.0))
    )
    watcher = UploadWatcher(
        upload_dir.absolute(),
        lambda files: do_ingest(settings, files),
        quiet_seconds=quiet,
        marker=str(settings.watch.get("marker", "UPLOAD_COMPLETE")),
    )
    warn_about_drift(settings)
    if once:
        watcher.quiet_seconds = 0.0
        watcher.scan()
        return
    typer.echo(f"watching {upload_dir} (quiet {quiet:g} s, rescan every {rescan:g} s)")
    watcher.run(rescan_seconds=rescan)
