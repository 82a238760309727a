"""``autowisp stars list | export``: the fields' star lists (:mod:`autowisp.db.stars`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select

from autowisp.cli.pipeline import _cells, _settings, console, ensure_schema
from autowisp.db.models import Camera, Field, FieldStar, Star, StarFlag
from autowisp.db.session import session_scope
from autowisp.db.stars import export_stars, registry_version
from autowisp.errors import NotFoundError

stars_app = typer.Typer(
    help="The star list: every field's stars, one identity across fields and cameras.",
    no_args_is_help=True,
)


@stars_app.command("list")
def stars_list() -> None:
    """Fields with their number of stars (and of those not detected on a stack yet)."""
    settings = _settings()
    ensure_schema(settings)
    catalogue_only = Star.flags.bitwise_and(int(StarFlag.CATALOGUE_ONLY)) != 0
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Field.id, Field.name, Camera.serial, func.count(FieldStar.id),
                   func.count(Star.id).filter(catalogue_only))
            .join(Camera, Camera.id == Field.camera_id)
            .outerjoin(FieldStar, FieldStar.field_id == Field.id)
            .outerjoin(Star, Star.id == FieldStar.star_id)
            .group_by(Field.id, Field.name, Camera.serial)
            .order_by(Field.id)
        ).all()  # fmt: skip
        total = session.scalar(select(func.count(Star.id)))
        version = registry_version(session)
    table = Table(title="fields and their stars")
    for column in ("field", "name", "camera", "stars", "catalogue only"):
        table.add_column(
            column, justify="right" if column in ("stars", "catalogue only") else "left"
        )
    for row in rows:
        table.add_row(*_cells(*row))
    console.print(table)
    console.print(Text(f"{total} distinct stars; star registry version {version}"))


@stars_app.command("export")
def stars_export(
    field: Annotated[str, typer.Argument(help="Field name or id (`autowisp stars list`).")],
    path: Annotated[Path, typer.Argument(help="Output file: .fits (binary table) or .csv.")],
) -> None:
    """Write a field's star list (ids, Gaia ids, positions, magnitudes, flags) to PATH."""
    settings = _settings()
    ensure_schema(settings)
    try:
        with session_scope(settings.database_url) as session:
            written = export_stars(session, field, path)
    except (NotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    typer.echo(
        f"wrote {written.stars} stars of field {written.field_name} to {written.path} "
        f"(star registry version {written.registry_version})"
    )
