"""``autowisp init | ingest | run | status | config show``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.engine import make_url

from autowisp.config import Settings
from autowisp.db.migrate import current_revision, head_revision, upgrade
from autowisp.db.session import session_scope
from autowisp.errors import AutowispError
from autowisp.ingest.ingest import IngestReport, ingest_paths
from autowisp.pipeline.configuration import resolve_versions
from autowisp.pipeline.local import RunSummary, prepare, run_local
from autowisp.pipeline.status import STATES, collect_status
from autowisp.steps.registry import load_registry

console = Console()
if not console.is_terminal:
    console = Console(width=160)  # piped or logged: do not squeeze the tables to 80 columns
errors = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings.load()
    except AutowispError as error:
        raise typer.BadParameter(str(error)) from error


def shown_url(url: str) -> str:
    """The database URL without its password."""
    return make_url(url).render_as_string(hide_password=True)


def ensure_schema(settings: Settings) -> None:
    """Migrate the embedded database on first use; ask for `autowisp init` otherwise."""
    if current_revision(settings.database_url) == head_revision():
        return
    if settings.is_embedded:
        upgrade(settings.database_url)
        return
    errors.print(
        f"[red]the database {shown_url(settings.database_url)} is not at the current schema "
        f"({head_revision()}): run `autowisp init` first[/red]"
    )
    raise typer.Exit(2)


def _progress(label: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=errors,
        transient=not errors.is_terminal,
    )


def init(
    wait: Annotated[
        float, typer.Option(help="Keep trying to reach the database this long, s.")
    ] = 0.0,
) -> None:
    """Create or upgrade the database schema (PostgreSQL, or the embedded SQLite)."""
    from autowisp.pipeline.runner import with_db_retry

    settings = _settings()
    with_db_retry(lambda: upgrade(settings.database_url), patience=wait)
    typer.echo(
        f"database {shown_url(settings.database_url)} is at revision "
        f"{current_revision(settings.database_url)}"
    )


def do_ingest(settings: Settings, paths: list[Path]) -> IngestReport:
    """Ingest paths with a progress bar, plan the nights' tasks, print a summary."""
    ensure_schema(settings)
    with _progress("ingesting") as bar:
        task = bar.add_task("", total=None)

        def report(path: Path, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=path.name)

        try:
            result = ingest_paths(
                settings.database_url, paths, rules=settings.ingest, progress=report
            )
        except (FileNotFoundError, AutowispError) as error:
            raise typer.BadParameter(str(error)) from error
    _, created = prepare(
        settings.database_url,
        load_registry(settings.registry_spec),
        settings.steps,
        nights=result.nights,
    )
    typer.echo(
        f"ingested {result.ingested} files into {len(result.nights)} night(s), "
        f"{result.duplicates} already known, {len(result.rejected)} rejected; "
        f"{created} new tasks"
    )
    for path, reason in result.rejected:
        typer.echo(f"  rejected {path}: {reason}")
    return result


def ingest(
    paths: Annotated[list[Path], typer.Argument(help="FITS files or directories (recursive).")],
) -> None:
    """Ingest uploaded frames: classify, register cameras and nights, create tasks."""
    do_ingest(_settings(), paths)


def do_run(settings: Settings, jobs: int) -> RunSummary:
    """Run every pending task locally with a progress bar."""
    ensure_schema(settings)
    with _progress("running") as bar:
        task = bar.add_task("", total=None)
        summary = run_local(
            settings.database_url,
            settings.storage_root,
            load_registry(settings.registry_spec),
            step_parameters=settings.steps,
            jobs=jobs,
            policy=settings.policy(),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    outcomes = (
        ", ".join(f"{n} {k}" for k, n in sorted(summary.outcomes.items())) or "nothing to do"
    )
    typer.echo(
        f"ran {summary.executed} tasks in {summary.seconds:.1f} s: {outcomes}"
        + (f"; {summary.excluded} excluded" if summary.excluded else "")
    )
    return summary


def run(
    paths: Annotated[list[Path] | None, typer.Argument(help="Ingest these first.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes.")] = 2,
) -> None:
    """Ingest PATHs (if given), then run every pending task to completion, locally."""
    settings = _settings()
    if paths:
        do_ingest(settings, paths)
    do_run(settings, jobs)


def print_status(
    settings: Settings, *, night: int | None = None, failed: bool = False, as_json: bool = False
) -> None:
    ensure_schema(settings)
    with session_scope(settings.database_url) as session:
        report = collect_status(session, night=night, failed_only=failed)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
        return
    table = Table(title="tasks by night and step")
    for column in ("night", "camera", "date", "step", *STATES, "total"):
        table.add_column(
            column, justify="right" if column in STATES or column == "total" else "left"
        )
    for row in report.progress:
        cells = [str(row[s]) if row[s] else "·" for s in STATES]
        table.add_row(
            str(row["night_id"]),
            row["camera_serial"],
            str(row["local_date"]),
            row["step"],
            *cells,
            str(row["total"]),
        )
    console.print(table)
    images = ", ".join(f"{n} {state}" for state, n in sorted(report.images.items()))
    console.print(f"images: {images or 'none'}")
    rate = report.throughput["tasks_per_minute"]
    console.print(
        f"throughput: {int(report.throughput['tasks_done'] or 0)} tasks done"
        + (f", {rate:.1f} per minute" if rate else "")
    )
    if report.failures:
        failures = Table(title="failed and dead tasks")
        for column in ("task", "step", "target", "state", "attempts", "error"):
            failures.add_column(column)
        for row in report.failures:
            failures.add_row(
                str(row["task_id"]),
                row["step"],
                row["target"],
                row["state"],
                str(row["attempts"]),
                str(row["last_error"]),
            )
        console.print(failures)
    if report.rejected:
        rejected = Table(title="rejected files")
        rejected.add_column("file")
        rejected.add_column("reason")
        for row in report.rejected:
            rejected.add_row(row["path"], row["reason"])
        console.print(rejected)


def status(
    night: Annotated[int | None, typer.Option(help="Only this night (id).")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Only steps with failures.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Progress by night and step, failures with their reasons, rejected files, throughput."""
    print_status(_settings(), night=night, failed=failed, as_json=as_json)


config_app = typer.Typer(help="Configuration.", no_args_is_help=True)


@config_app.command("show")
def config_show() -> None:
    """Settings in force and every step's parameters, defaults, units and version."""
    settings = _settings()
    try:
        registry = load_registry(settings.registry_spec)
        versions = resolve_versions(registry, settings.steps)
    except AutowispError as error:
        raise typer.BadParameter(str(error)) from error
    typer.echo(f"configuration file: {settings.config_file or '(none)'}")
    typer.echo(f"database: {shown_url(settings.database_url)}")
    typer.echo(f"storage: {settings.storage_root}")
    typer.echo(f"broker: {shown_url(settings.broker_url)}")
    for step in registry:
        version = versions[step.name]
        inputs = f" <- {', '.join(step.inputs)}" if step.inputs else ""
        typer.echo(
            f"[steps.{step.name}]  # {step.scope.value} scope{inputs}; version {version.version}"
        )
        for parameter in step.parameters:
            unit = f" [{parameter.unit}]" if parameter.unit else ""
            typer.echo(
                f"{parameter.name} = {json.dumps(version.parameters[parameter.name])}"
                f"  # default {json.dumps(parameter.default)}{unit}: {parameter.doc}"
            )


def retry(
    task: Annotated[list[int] | None, typer.Option("--task", help="Task id (repeatable).")] = None,
    step: Annotated[str | None, typer.Option(help="Only tasks of this step.")] = None,
    night: Annotated[int | None, typer.Option(help="Only tasks of this night (id).")] = None,
    excluded: Annotated[bool, typer.Option("--excluded", help="Excluded tasks too.")] = False,
) -> None:
    """Give dead tasks (and with --excluded, excluded ones) a fresh start once fixed."""
    from sqlalchemy import select

    from autowisp.db.models import Step, TaskState
    from autowisp.pipeline import state

    settings = _settings()
    ensure_schema(settings)
    states = [TaskState.DEAD] + ([TaskState.EXCLUDED] if excluded else [])
    with session_scope(settings.database_url) as session:
        step_ids = None
        if step is not None:
            step_ids = list(session.scalars(select(Step.id).where(Step.name == step)))
            if not step_ids:
                raise typer.BadParameter(f"no step named {step!r}")
        count = state.reset(
            session, states=states, task_ids=task, step_ids=step_ids, night_id=night
        )
    typer.echo(f"{count} task(s) pending again; `autowisp run` or the scheduler picks them up")
