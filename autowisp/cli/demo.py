"""``autowisp demo``: simulate a small night and process it end to end on the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select

from autowisp.cli.pipeline import _settings, do_ingest, do_run, print_status, shown_url
from autowisp.db.migrate import upgrade
from autowisp.db.models import Configuration, Step, Task, TaskState
from autowisp.db.session import session_scope
from autowisp.simulate.night import NightConfig, simulate_night


def demo(
    frames: Annotated[int, typer.Option(min=1, help="Object frames to simulate.")] = 8,
    size: Annotated[str, typer.Option(help="Frame size WIDTHxHEIGHT, px.")] = "512x512",
    seed: Annotated[int, typer.Option(help="Seed of the simulated night.")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes.")] = 2,
) -> None:
    """Simulate a night, ingest it into the embedded database, process it, show the results."""
    from autowisp.cli.simulate import _parse_size

    settings = _settings()
    width, height = _parse_size(size)
    upload = settings.home / "uploads" / f"demo-seed{seed}"
    typer.echo(f"simulating {frames} object frames of {width}x{height} px into {upload}")
    simulate_night(upload, NightConfig(frames=frames, width=width, height=height, seed=seed))
    upgrade(settings.database_url)
    typer.echo(f"database: {shown_url(settings.database_url)}")
    do_ingest(settings, [upload], close=True)
    do_run(settings, jobs)
    print_status(settings)
    with session_scope(settings.database_url) as session:
        outputs = session.execute(
            select(Step.name, Task.output_path, Task.qc)
            .join(Step, Step.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .where(
                Configuration.active.is_(True),
                Task.state == TaskState.DONE,
                Task.night_id.is_not(None),
                Task.image_id.is_(None),
            )
            .order_by(Task.id)
        ).all()
    typer.echo(f"outputs under {settings.storage_root}:")
    for step, path, qc in outputs:
        typer.echo(f"  {step}: {path}")
        if qc and qc.get("plot"):
            typer.echo(f"  {step} plot: {qc['plot']}")
        if step == "star_list" and qc:
            typer.echo(
                f"  star list: {qc.get('stars', 0)} stars, {qc.get('deep_only', 0)} of them "
                "beyond the catalogue (`autowisp stars export` writes a field's list)"
            )
    calibrated = sorted(settings.storage_root.glob("calibrate/*/*"))
    if calibrated:
        typer.echo(f"  calibrated frames (e-, compressed IMAGE and MASK HDUs): {calibrated[-1]}")
    solved = sorted(settings.storage_root.glob("astrometry/*/*"))
    if solved:
        typer.echo(f"  astrometry (TAN-SIP WCS, SOURCES and CATALOGUE positions): {solved[-1]}")
    photometry = sorted(settings.storage_root.glob("photometry/*/*"))
    if photometry:
        typer.echo(
            "  photometry (HDF5, a group per channel: apertures, PSF fluxes, backgrounds, "
            f"flags, PSF map): {photometry[-1]}"
        )
    shards = sorted(settings.storage_root.glob("lightcurves/*/*/*.h5"))
    if shards:
        typer.echo(
            f"  light curves (every star of the field over every night, {len(shards)} shard "
            f"file(s); `autowisp lc export --all` writes one FITS file per star): {shards[-1]}"
        )
    statistics = sorted(settings.storage_root.glob("lc_statistics/*/*/*.h5"))
    if statistics:
        typer.echo(f"  light-curve statistics per star (RMS, MAD, points): {statistics[-1]}")
    truth = next(Path(upload).rglob("truth.h5"))
    typer.echo(f"ground truth of the simulated night: {truth}")
    if photometry:
        _print_precision(sorted(photometry[-1].glob("*.h5")), truth)
    magfit = sorted(settings.storage_root.glob("magfit/*/*/*.h5"))
    if magfit:
        _print_magfit_precision(magfit[-1], truth)


def _print_precision(files: list[Path], truth: Path) -> None:
    """The precision reached against the truth (see :mod:`autowisp.simulate.assess`)."""
    from autowisp.simulate.assess import night_precision

    results = night_precision(files, truth)
    if not results:
        typer.echo("precision: no star was measured on every frame")
        return
    typer.echo(
        "precision against the truth (median RMS over the night of the brightest stars, "
        "after a per-frame zero point):"
    )
    for r in results:
        typer.echo(
            f"  {r.channel:>4}: aperture {r.aperture:g} px {r.measured_mmag:.1f} mmag, "
            f"PSF fit {r.psf_mmag:.1f} mmag, expected from errors {r.expected_mmag:.1f} mmag "
            f"({r.stars} stars, {r.frames} frames)"
        )


def _print_magfit_precision(path: Path, truth: Path) -> None:
    """The light curves' scatter after magnitude fitting against the theoretical noise."""
    from autowisp.simulate.assess import magfit_precision

    best: dict[str, Any] = {}
    for row in magfit_precision(path, truth, min_fraction=0.75):
        if row.channel not in best or row.ratio < best[row.channel].ratio:
            best[row.channel] = row
    if not best:
        typer.echo("after magnitude fitting: no unsaturated G 7-11 star on 3/4 of the frames")
        return
    typer.echo(
        f"after magnitude fitting ({path}), unsaturated G 7-11 stars, the best aperture: "
        "median RMS / theoretical noise (photons, sky, read noise, scintillation)"
    )
    for channel, r in best.items():
        typer.echo(
            f"  {channel:>4}: {r.photometry} {r.ratio:.2f} ({r.rms_mmag:.1f} mmag against "
            f"{r.theory_mmag:.1f}; {r.stars} stars)"
        )
