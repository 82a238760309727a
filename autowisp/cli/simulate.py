"""``autowisp simulate``: write a simulated DSLR night with its ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autowisp.core.bayer import LAYOUTS
from autowisp.simulate.night import DEFAULT_FIELD, NightConfig, simulate_night


def _parse_size(size: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError as error:
        raise typer.BadParameter(
            f"expected WIDTHxHEIGHT such as 1024x768, got {size!r}"
        ) from error
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise typer.BadParameter(
            f"width and height must be even and at least 16 px, got {width}x{height}"
        )
    return width, height


def simulate(
    outdir: Annotated[Path, typer.Argument(help="Directory to write the night into.")],
    frames: Annotated[int, typer.Option(min=1, help="Object frames per camera.")] = 20,
    size: Annotated[str, typer.Option(help="Frame size WIDTHxHEIGHT in px.")] = "1024x1024",
    layout: Annotated[str, typer.Option(help=f"Bayer layout: {', '.join(LAYOUTS)}.")] = "RGGB",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    cameras: Annotated[int, typer.Option(min=1, help="Cameras observing the field.")] = 1,
    ra: Annotated[float, typer.Option(help="Field centre RA, deg.")] = DEFAULT_FIELD[0],
    dec: Annotated[float, typer.Option(help="Field centre Dec, deg.")] = DEFAULT_FIELD[1],
    date: Annotated[str, typer.Option(help="Local date the night starts.")] = "2024-09-10",
    exptime: Annotated[float, typer.Option(help="Object exposure time, s.")] = 120.0,
    calibration: Annotated[
        int,
        typer.Option(
            "--calibration-frames",
            min=0,
            help="Bias, dark and good flat frames each (plus 2 bad flats).",
        ),
    ] = 10,
) -> None:
    """Simulate a night of raw DSLR frames (bias, dark, flat, object) with ground truth."""
    width, height = _parse_size(size)
    try:
        config = NightConfig(
            frames=frames,
            width=width,
            height=height,
            layout=layout.upper(),
            seed=seed,
            cameras=cameras,
            ra=ra,
            dec=dec,
            date=date,
            exptime=exptime,
            cadence=max(exptime + 15.0, 135.0),
            biases=calibration,
            darks=calibration,
            flats=calibration,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    if outdir.exists() and any(outdir.iterdir()):
        typer.echo(f"note: writing into non-empty {outdir}; files of the same name are replaced")
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]simulating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as bar:
        task = bar.add_task("", total=None)

        def report(label: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=label)

        result = simulate_night(outdir, config, progress=report)
    for camera in result.cameras:
        counts = ", ".join(f"{n} {kind}" for kind, n in camera["frames"].items())
        typer.echo(
            f"camera {camera['model']} #{camera['serial']}: {counts} frames in "
            f"{outdir / camera['directory']}; {camera['stars']} stars; truth "
            f"{outdir / camera['truth']}"
        )
    typer.echo(f"manifest: {result.manifest}")
