"""``autowisp lc export``: stars' light curves as FITS (lightkurve-readable) or CSV files."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from autowisp.cli.pipeline import _settings, console, ensure_schema
from autowisp.db.lightcurves import locate_light_curves
from autowisp.db.session import session_scope
from autowisp.errors import NotFoundError
from autowisp.io.lightcurves import (
    light_curve_table,
    read_field_scale,
    star_light_curves,
    write_light_curve,
)

lc_app = typer.Typer(
    help="Light curves: every star of a field over every night processed.",
    no_args_is_help=True,
)

#: Stars read from a shard at once when exporting a whole field.
READ_STARS = 200


class Format(enum.StrEnum):
    FITS = "fits"
    CSV = "csv"


def export(
    stars: list[str],
    *,
    every_star: bool,
    field: str | None,
    file_format: str,
    out: Path,
) -> tuple[list[Path], list[str]]:
    """Write the light curves; returns the files written and what could not be."""
    settings = _settings()
    ensure_schema(settings)
    with session_scope(settings.database_url) as session:
        located = locate_light_curves(session, stars, field_name=field, every_star=every_star)
    problems = list(located.missing)
    written: list[Path] = []
    total = sum(len(s.stars) for s in located)
    with Progress(console=console, transient=True, disable=total < 50) as progress:
        task = progress.add_task("exporting light curves", total=total)
        for shard in located:
            items = list(shard.stars)
            if shard.statistics is None:
                problems.append(
                    f"shard {shard.shard}: its field has no light-curve statistics yet, so "
                    "each night's fitted magnitudes are on that night's own scale"
                )
            for start in range(0, len(items), READ_STARS):
                chunk = items[start : start + READ_STARS]
                scale = (
                    read_field_scale(Path(shard.statistics), [i.star_index for i, _ in chunk])
                    if shard.statistics is not None
                    else None
                )
                points = star_light_curves(Path(shard.path), [p for _, p in chunk], scale)
                for identity, position in chunk:
                    curve = light_curve_table(identity, points[position])
                    progress.advance(task)
                    if len(curve) == 0:
                        if not every_star:
                            problems.append(
                                f"star {identity.star_id}: no point in shard {shard.shard}"
                            )
                        continue
                    ident = (
                        f"gaia{identity.gaia_source_id}"
                        if identity.gaia_source_id >= 0
                        else f"star{identity.star_id}"
                    )
                    path = out / identity.field_name / f"{ident}.{file_format}"
                    written.append(write_light_curve(path, curve, file_format=file_format))
    return written, problems


@lc_app.command("export")
def lc_export(
    stars: Annotated[
        list[str] | None,
        typer.Argument(help="Stars: database star ids, or Gaia DR3 ids as gaia:<source_id>."),
    ] = None,
    every_star: Annotated[
        bool,
        typer.Option("--all", help="Every star of the field (of every field without --field)."),
    ] = False,
    field: Annotated[
        str | None, typer.Option("--field", help="Only this field (name or id).")
    ] = None,
    file_format: Annotated[Format, typer.Option("--format", help="File format.")] = Format.FITS,
    out: Annotated[Path, typer.Option("--out", help="Directory to write into.")] = Path(
        "lightcurves"
    ),
) -> None:
    """Write stars' light curves (BTJD times, relative flux, raw and fitted magnitudes per
    channel), one file per star under OUT/<field>/."""
    try:
        written, problems = export(
            list(stars or []), every_star=every_star, field=field,
            file_format=file_format.value, out=out,
        )  # fmt: skip
    except (NotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    for problem in problems:
        console.print(problem, markup=False, highlight=False)
    typer.echo(f"wrote {len(written)} light curves under {out}")
    if not written:
        raise typer.Exit(1)
