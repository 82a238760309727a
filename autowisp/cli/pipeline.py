"""``autowisp init | ingest | run | close-night | status | retry | prune | config show|apply``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from autowisp.config import Settings
from autowisp.db.migrate import current_revision, head_revision, upgrade
from autowisp.db.session import session_scope
from autowisp.errors import AutowispError
from autowisp.ingest.ingest import IngestReport, ingest_paths
from autowisp.pipeline.configuration import (
    StepVersion,
    activate,
    active_configurations,
    configuration_drift,
    resolve_versions,
)
from autowisp.pipeline.cycle import field_radius, night_quiet_seconds
from autowisp.pipeline.local import RunSummary, run_local
from autowisp.pipeline.status import STATES, collect_status
from autowisp.steps.registry import Registry, load_registry

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
    """Create or upgrade the database schema, and activate the configuration file's step
    parameters (PostgreSQL, or the embedded SQLite)."""
    from autowisp.pipeline.runner import with_db_retry

    settings = _settings()
    with_db_retry(lambda: upgrade(settings.database_url), patience=wait)
    typer.echo(
        f"database {shown_url(settings.database_url)} is at revision "
        f"{current_revision(settings.database_url)}"
    )
    apply_file_configuration(settings)


def file_versions(settings: Settings) -> tuple[Registry, dict[str, StepVersion]]:
    """The pipeline and the configuration file's version of every step (a bad parameter
    is reported as the command's bad input)."""
    registry = load_registry(settings.registry_spec)
    try:
        return registry, resolve_versions(registry, settings.steps)
    except AutowispError as error:
        raise typer.BadParameter(str(error)) from error


def apply_file_configuration(settings: Settings) -> list[str]:
    """Make the configuration file's step parameters the active ones: the steps whose
    version changed (their tasks, and their downstream steps', run again)."""
    registry, versions = file_versions(settings)
    with session_scope(settings.database_url) as session:
        changed = configuration_drift(session, registry, versions)
        activate(session, registry, versions)
    if changed:
        typer.echo(f"active configuration: new versions for {', '.join(changed)}")
    return changed


def run_parameters(settings: Settings) -> dict[str, Any]:
    """The step parameters a local run uses. The embedded database follows the
    configuration file (its user is its operator); a shared database keeps its active
    configuration, and a differing file is reported, not applied."""
    registry, versions = file_versions(settings)
    with session_scope(settings.database_url) as session:
        drift = configuration_drift(session, registry, versions)
        first_use = len(drift) == len(registry) and not _any_active(session)
        if settings.is_embedded:
            if drift and not first_use:
                typer.echo(f"configuration file applied: new versions for {', '.join(drift)}")
            return {name: dict(version.parameters) for name, version in versions.items()}
        try:
            active = active_configurations(session, registry)
        except AutowispError as error:
            typer.echo(str(error), err=True)
            raise typer.Exit(2) from error
        if drift:
            typer.echo(
                f"the configuration file differs from the database's active configuration "
                f"for {', '.join(drift)}: running with the active one (activate yours with "
                "`autowisp config apply`)",
                err=True,
            )
        return {name: dict(c.parameters) for name, c in active.items()}


def _any_active(session: Any) -> bool:
    from sqlalchemy import select

    from autowisp.db.models import Configuration

    return (
        session.scalar(select(Configuration.id).where(Configuration.active.is_(True))) is not None
    )


def do_ingest(settings: Settings, paths: list[Path], *, close: bool = False) -> IngestReport:
    """Ingest paths with a progress bar and print a summary; with ``close``, the nights
    the files went to are closed (complete: their barriers may run)."""
    ensure_schema(settings)
    with _progress("ingesting") as bar:
        task = bar.add_task("", total=None)

        def report(path: Path, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=path.name)

        try:
            result = ingest_paths(
                settings.database_url,
                paths,
                rules=settings.ingest,
                progress=report,
                close=close,
                marker=str(settings.watch.get("marker", "UPLOAD_COMPLETE")),
            )
        except (FileNotFoundError, AutowispError) as error:
            raise typer.BadParameter(str(error)) from error
    closed = f"; {len(result.closed)} closed" if result.closed else ""
    typer.echo(
        f"ingested {result.ingested} files into {len(result.nights)} night(s){closed}, "
        f"{result.duplicates} already known, {len(result.rejected)} rejected"
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
    """Run every pending task locally with a progress bar; say what is left waiting."""
    ensure_schema(settings)
    parameters = run_parameters(settings)
    with _progress("running") as bar:
        task = bar.add_task("", total=None)
        summary = run_local(
            settings.database_url,
            settings.storage_root,
            load_registry(settings.registry_spec),
            step_parameters=parameters,
            jobs=jobs,
            policy=settings.policy(),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            night_quiet_seconds=night_quiet_seconds(settings),
            field_radius=field_radius(settings),
        )
    outcomes = (
        ", ".join(f"{n} {k}" for k, n in sorted(summary.outcomes.items())) or "nothing to do"
    )
    typer.echo(
        f"ran {summary.executed} tasks in {summary.seconds:.1f} s: {outcomes}"
        + (f"; {summary.excluded} excluded" if summary.excluded else "")
    )
    _explain_left_over(summary)
    return summary


def _explain_left_over(summary: RunSummary, *, limit: int = 20) -> None:
    """What a run left waiting and why, and the nights still open (plain text: reasons
    quote file names and headers, which must never be read as markup)."""
    if summary.open_nights:
        nights = ", ".join(f"{i} ({d})" for i, d in summary.open_nights)
        typer.echo(
            f"open nights: {nights}; their barriers wait for them to close (an upload "
            "marker file, the quiet period, or `autowisp close-night ID`)"
        )
    if summary.waiting:
        typer.echo(f"{len(summary.waiting)} task(s) still waiting:")
        for waiting in summary.waiting[:limit]:
            typer.echo(
                f"  task {waiting.task_id} {waiting.step} {waiting.target}: {waiting.reason}"
            )
        if len(summary.waiting) > limit:
            typer.echo(f"  ... and {len(summary.waiting) - limit} more (`autowisp status`)")


def run(
    paths: Annotated[list[Path] | None, typer.Argument(help="Ingest these first.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes.")] = 2,
) -> None:
    """Ingest PATHs (if given), then run every pending task to completion, locally."""
    settings = _settings()
    if paths:
        do_ingest(settings, paths, close=True)
    summary = do_run(settings, jobs)
    if summary.waiting or (paths is None and summary.open_nights):
        raise typer.Exit(3)


def _cells(*values: object) -> list[Text]:
    """Table cells as plain text: file names, headers and errors are never markup."""
    return [Text("" if v is None else str(v)) for v in values]


def print_status(
    settings: Settings, *, night: int | None = None, failed: bool = False, as_json: bool = False
) -> None:
    ensure_schema(settings)
    with session_scope(settings.database_url) as session:
        report = collect_status(session, night=night, failed_only=failed)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
        return
    table = Table(title="tasks by night and step (current generation)")
    for column in ("night", "camera", "date", "state", "gen", "step", *STATES, "total"):
        numeric = column in STATES or column in ("total", "gen")
        table.add_column(column, justify="right" if numeric else "left")
    for row in report.progress:
        cells = [str(row[s]) if row[s] else "·" for s in STATES]
        table.add_row(
            *_cells(
                row["night_id"], row["camera_serial"], row["local_date"], row["night_state"],
                row["generation"], row["step"], *cells, row["total"],
            )
        )  # fmt: skip
    console.print(table)
    for open_night in report.open_nights:
        console.print(
            Text(
                f"night {open_night['night_id']} ({open_night['camera_serial']} "
                f"{open_night['local_date']}) is open since its last frame at "
                f"{open_night['last_file_at']}: its barriers and what needs them wait for it "
                "to close (an upload marker file, the quiet period, or "
                f"`autowisp close-night {open_night['night_id']}`)"
            )
        )
    if report.fields and not failed:
        fields = Table(title="fields and their light-curve shards")
        for column in (
            "field",
            "name",
            "camera",
            "frames",
            "nights",
            "in shards",
            "shards",
            "gen",
            "shard/field tasks",
        ):
            fields.add_column(column)
        for row in report.fields:
            tasks = ", ".join(f"{n} {s}" for s, n in sorted(row["tasks"].items())) or "·"
            fields.add_row(
                *_cells(
                    row["field_id"],
                    row["name"],
                    row["camera_serial"],
                    row["frames"],
                    row["nights"],
                    row["nights_in_shards"],
                    row["shards"],
                    row["generation"],
                    tasks,
                )
            )
        console.print(fields)
    images = ", ".join(f"{n} {state}" for state, n in sorted(report.images.items()))
    console.print(Text(f"images: {images or 'none'}"))
    rate = report.throughput["tasks_per_minute"]
    console.print(
        Text(
            f"throughput: {int(report.throughput['tasks_done'] or 0)} tasks done"
            + (f", {rate:.1f} per minute" if rate else "")
        )
    )
    if report.waiting and not failed:
        waiting = Table(title="waiting tasks and why (grouped)")
        for column in ("step", "tasks", "reason", "example target"):
            waiting.add_column(column)
        for row in report.waiting:
            waiting.add_row(*_cells(row["step"], row["tasks"], row["reason"], row["target"]))
        console.print(waiting)
    if report.failures:
        failures = Table(title="failed and dead tasks")
        for column in ("task", "step", "target", "state", "kind", "attempts", "error"):
            failures.add_column(column)
        for row in report.failures:
            error = str(row["last_error"] or "")
            failures.add_row(
                *_cells(
                    row["task_id"], row["step"], row["target"], row["state"],
                    row["error_kind"], row["attempts"], error.splitlines()[0] if error else "",
                )
            )  # fmt: skip
        console.print(failures)
    if report.rejected:
        rejected = Table(title="rejected files")
        rejected.add_column("file")
        rejected.add_column("reason")
        for row in report.rejected:
            rejected.add_row(*_cells(row["path"], row["reason"]))
        console.print(rejected)
    if report.rejected_frames:
        frames = Table(title="frames rejected by master steps")
        for column in ("night", "step", "file", "reason"):
            frames.add_column(column)
        for row in report.rejected_frames:
            frames.add_row(*_cells(row["night_id"], row["step"], row["path"], row["reason"]))
        console.print(frames)


def status(
    night: Annotated[int | None, typer.Option(help="Only this night (id).")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Only steps with failures.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Progress by night and step, failures with their reasons, rejected files, throughput."""
    print_status(_settings(), night=night, failed=failed, as_json=as_json)


def close_night(
    night_ids: Annotated[list[int] | None, typer.Argument(help="Night ids to close.")] = None,
    all_open: Annotated[bool, typer.Option("--all", help="Close every open night.")] = False,
) -> None:
    """Close nights whose upload is complete: their barriers (masters, night QC) run."""
    from sqlalchemy import select

    from autowisp.db.models import Night, NightState
    from autowisp.db.nights import close_nights

    settings = _settings()
    ensure_schema(settings)
    if not night_ids and not all_open:
        raise typer.BadParameter("name the nights to close (ids from `autowisp status`) or --all")
    with session_scope(settings.database_url) as session:
        if all_open:
            night_ids = list(
                session.scalars(select(Night.id).where(Night.state == NightState.OPEN))
            )
        unknown = set(night_ids or []) - set(
            session.scalars(select(Night.id).where(Night.id.in_(night_ids or [])))
        )
        if unknown:
            raise typer.BadParameter(f"no night with id {sorted(unknown)}")
        closed = close_nights(session, night_ids or [], reason="operator (autowisp close-night)")
    already = sorted(set(night_ids or []) - set(closed))
    typer.echo(
        f"closed {len(closed)} night(s)"
        + (f"; already closed: {', '.join(map(str, already))}" if already else "")
    )


config_app = typer.Typer(help="Configuration.", no_args_is_help=True)


@config_app.command("apply")
def config_apply() -> None:
    """Make the configuration file's step parameters the active configuration (steps whose
    version changes run again, with everything downstream of them)."""
    settings = _settings()
    ensure_schema(settings)
    if not apply_file_configuration(settings):
        typer.echo("the active configuration already is the file's")


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
        edges = load_registry(settings.registry_spec).edges(step.name)
        inputs = (
            " <- " + ", ".join(f"{edge.step} ({edge.kind.value})" for edge in edges)
            if edges
            else ""
        )
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

    from autowisp.db.models import Step, Task, TaskState
    from autowisp.pipeline import state
    from autowisp.pipeline.retention import pruned_inputs

    settings = _settings()
    ensure_schema(settings)
    states = [TaskState.DEAD] + ([TaskState.EXCLUDED] if excluded else [])
    refused: list[tuple[int, str]] = []
    with session_scope(settings.database_url) as session:
        step_ids = None
        if step is not None:
            step_ids = list(session.scalars(select(Step.id).where(Step.name == step)))
            if not step_ids:
                raise typer.BadParameter(f"no step named {step!r}")
        # A task whose recorded inputs were pruned would run against missing files.
        query = select(Task.id, Task.inputs).where(Task.state.in_(states))
        if task is not None:
            query = query.where(Task.id.in_(task))
        if step_ids is not None:
            query = query.where(Task.step_id.in_(step_ids))
        if night is not None:
            query = query.where(Task.night_id == night)
        allowed = []
        for task_id, inputs in session.execute(query).all():
            pruned = pruned_inputs(session, inputs)
            if pruned:
                names = ", ".join(f"{name} task {i}" for name, i, _ in pruned)
                refused.append((task_id, names))
            else:
                allowed.append(task_id)
        count = state.reset(session, states=states, task_ids=allowed) if allowed else 0
    typer.echo(f"{count} task(s) pending again; `autowisp run` or the scheduler picks them up")
    for task_id, names in refused:
        typer.echo(
            f"  task {task_id} not reset: its inputs were deleted by the retention policy "
            f"({names}); they must be made again first"
        )
    if refused:
        raise typer.Exit(1)


def prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be deleted.")
    ] = False,
) -> None:
    """Delete the intermediate products the ``[storage.retention]`` policy lets go, and
    record it in their task rows (an empty policy, the default, deletes nothing)."""
    from autowisp.pipeline.retention import RetentionPolicy
    from autowisp.pipeline.retention import prune as prune_products

    settings = _settings()
    ensure_schema(settings)
    registry = load_registry(settings.registry_spec)
    try:
        policy = RetentionPolicy.from_table(settings.retention, registry=registry)
    except AutowispError as error:
        raise typer.BadParameter(str(error)) from error
    if not policy.enabled:
        typer.echo("no retention policy ([storage.retention] is empty): nothing is deleted")
        return
    with session_scope(settings.database_url) as session:
        report = prune_products(session, registry, policy, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for item in report.items:
        typer.echo(
            f"{verb} task {item.task_id} {item.step} {item.target} {item.path} "
            f"({item.size_bytes} bytes): {item.reason}"
        )
    for path in report.missing:
        typer.echo(f"  already missing: {path}")
    for path, error in report.failed:
        typer.echo(f"  could not delete {path}: {error}", err=True)
    typer.echo(
        f"{verb} {len(report.items)} product(s), {report.bytes_freed} bytes "
        f"({report.bytes_freed / 1e9:.3f} GB)"
    )
    if report.failed:
        raise typer.Exit(1)
