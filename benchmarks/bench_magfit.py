"""Benchmark the magnitude fit of a large night: time, memory and precision.

Synthetic photometry files (:mod:`autowisp.simulate.photometry_night`; ``--frames``
300 frames of ``--stars`` 20,000 stars, 3 apertures and the PSF flux, 4 channels; partial
clouds on 3 % of the frames) are written once, not timed. Then the ``magfit`` step runs in
this process on one core (BLAS limited to one thread) the way the runner runs it: wall
clock, CPU time and the peak resident memory it added (``VmHWM`` reset just before, minus
the resident size then, MB), with the precision table: per channel and magnitude bin, the
median over stars of the light curve's RMS over its theoretical noise (1.0 is the noise).

The peer, on the same files in the same run: the same algorithm written the way a numpy
script does it (every frame's magnitudes in memory at once, ``numpy.linalg.lstsq`` per
frame with the same rejection, ``numpy.nanmedian`` masters; no finer terms for clouds, no
anchoring of the master): time, memory and its precision.

Usage (from the repository root): python -m benchmarks.bench_magfit [--frames N]
[--stars N] [--home DIR] [--no-peer]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402

from benchmarks.bench_frame import _reset_peak, _status_mb  # noqa: E402

BINS = ((7.5, 9.0), (9.0, 10.0), (10.0, 11.0), (11.0, 12.0), (12.0, 13.0), (13.0, 14.0))


def _context(directory: Path, synthetic, night, parameters=None):  # type: ignore[no-untyped-def]
    from autowisp.steps.base import ImageInfo, InputProduct, NightInfo, StepContext
    from autowisp.steps.magfit import Magfit
    from autowisp.vocabulary import ImageType

    images = tuple(
        ImageInfo(id=i + 1, path=Path(p.name.replace(".h5", ".fits")),
                  image_type=ImageType.OBJECT, exptime=night.exptime,
                  date_obs=dt.datetime(2024, 9, 11, tzinfo=dt.UTC), jd=float(synthetic.jd_mid[i]),
                  layout="RGGB", camera_serial="bench", header=synthetic.header,
                  field_id=night.field_id, field_name="bench")
        for i, p in enumerate(synthetic.paths)
    )  # fmt: skip
    products = tuple(
        InputProduct(target=f"image:{i + 1}", image_id=i + 1, output_path=p, qc={})
        for i, p in enumerate(synthetic.paths)
    )
    defaults = {p.name: p.default for p in Magfit.parameters}
    return StepContext(
        task_id=1, step="magfit", target="night:1", config_version="bench",
        parameters={**defaults, **(parameters or {})}, storage_root=directory / "storage",
        night=NightInfo(id=1, local_date=dt.date(2024, 9, 10), camera_serial="bench",
                        layout="RGGB", images=images),
        inputs={"photometry": products},
    )  # fmt: skip


def _precision(fitted_of, synthetic, night) -> list[list]:  # type: ignore[no-untyped-def]
    """Per channel and bin: [channel, bin, stars, median RMS/theory] (photometry ap of
    the middle radius)."""
    rows = []
    middle = len(night.apertures) // 2
    for channel in night.channels:
        fitted = fitted_of(channel, middle)
        seen = np.isfinite(fitted).sum(axis=0) >= 0.8 * night.frames
        rms = np.full(fitted.shape[1], np.nan)
        rms[seen] = np.nanstd(fitted[:, seen], axis=0, ddof=1)
        theory = np.sqrt(np.mean(synthetic.sigma[channel][:, :, middle] ** 2, axis=0)
                         + np.var(synthetic.variable_mag, axis=0, ddof=1))  # fmt: skip
        mag = synthetic.true_mag["G1"]
        for lo, hi in BINS:
            chosen = seen & (mag >= lo) & (mag < hi)
            ratio = float(np.median(rms[chosen] / theory[chosen])) if chosen.any() else np.nan
            rows.append([channel, f"{lo:g}-{hi:g}", int(chosen.sum()), round(ratio, 3)])
    return rows


def _ours(directory: Path, synthetic, night) -> dict:  # type: ignore[no-untyped-def]
    from autowisp.io.magfit import read_fitted_block, read_magfit
    from autowisp.steps.magfit import Magfit

    context = _context(directory, synthetic, night)
    before = _status_mb("VmRSS")
    _reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    result = Magfit().run(context)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = _status_mb("VmHWM") - before
    _, fields = read_magfit(result.output_path)

    def fitted_of(channel: str, p: int) -> np.ndarray:
        block = read_fitted_block(result.output_path, 1, channel, slice(None))
        return block["fitted"][:, :, p].astype(float)

    return {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "peak_mb": round(peak, 1),
        "iterations": fields[0].iterations,
        "changes": fields[0].changes,
        "product_mb": round(result.output_path.stat().st_size / 1024**2, 1),
        "precision": _precision(fitted_of, synthetic, night),
    }


def _peer(synthetic, night) -> dict:  # type: ignore[no-untyped-def]
    """The same fit, in memory, the plain numpy way."""
    from autowisp.core.magfit import parse_expression, star_airmass
    from autowisp.core.photometry import SPOILING
    from autowisp.io.photometry import read_frame_photometry

    before = _status_mb("VmRSS")
    _reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    products = [read_frame_photometry(p) for p in synthetic.paths]
    expression = parse_expression("O3{mag, x, y} + colour + colour*airmass")
    n_frames, n_stars = len(products), len(products[0].source_id)
    n_phot = len(night.apertures) + 1
    fitted_all = {}
    raw = {}
    for channel in night.channels:
        mag = np.full((n_frames, n_stars, n_phot), np.nan)
        err = np.full((n_frames, n_stars, n_phot), np.nan)
        for i, product in enumerate(products):
            phot = product.channels[channel]
            flux = np.column_stack([phot.flux, phot.psf_flux])
            error = np.column_stack([phot.flux_err, phot.psf_flux_err])
            bad = ((phot.flags & int(SPOILING)) != 0)[:, None] | ~(flux > 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mag[i] = np.where(bad, np.nan, -2.5 * np.log10(flux / night.exptime))
                err[i] = np.where(bad, np.nan, 1.0857 * error / flux)
        raw[channel] = (mag, err)
    known = {c: np.nanmedian(raw[c][0], axis=0) for c in night.channels}
    colour = known["R"] - known["B"]
    colour = np.where(np.isfinite(colour), colour, np.nanmedian(colour)) - np.nanmedian(colour)
    site = synthetic_site(synthetic)
    airmass = [star_airmass(synthetic.ra, synthetic.dec, jd, *site) for jd in synthetic.jd_mid]
    for channel in night.channels:
        mag, err = raw[channel]
        reference = mag[0].copy()
        fitted = np.full_like(mag, np.nan)
        for _ in range(5):
            for i, product in enumerate(products):
                x = product.x / night.width * 2 - 1
                y = product.y / night.height * 2 - 1
                air = airmass[i]
                for p in range(n_phot):
                    variables = {"mag": known[channel][:, p] - np.nanmedian(known[channel][:, p]),
                                 "x": x, "y": y, "colour": colour[:, p], "airmass": air}  # fmt: skip
                    design = expression.design(variables)
                    target = reference[:, p] - mag[i, :, p]
                    sigma = err[i, :, p]
                    use = np.isfinite(target) & (sigma <= 0.1)
                    weight = 1 / (sigma + 0.01) ** 2
                    for _ in range(20):
                        root = np.sqrt(weight[use])
                        beta = np.linalg.lstsq(design[use] * root[:, None], target[use] * root,
                                               rcond=None)[0]  # fmt: skip
                        residual = target - design @ beta
                        limit = 25 * np.sum(weight[use] * residual[use] ** 2) / use.sum()
                        new = (
                            np.isfinite(target) & (sigma <= 0.1) & (weight * residual**2 <= limit)
                        )
                        if np.array_equal(new, use):
                            break
                        use = new
                    fitted[i, :, p] = mag[i, :, p] + design @ beta
            master = np.nanmedian(fitted, axis=0)
            change = np.nanmean((master - reference) ** 2)
            reference = master
            if change < 1e-4:
                break
        fitted_all[channel] = fitted
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = _status_mb("VmHWM") - before
    return {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "peak_mb": round(peak, 1),
        "precision": _precision(lambda c, p: fitted_all[c][:, :, p], synthetic, night),
    }


def synthetic_site(synthetic) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    return float(synthetic.header["LAT-OBS"]), float(synthetic.header["LONG-OBS"])


def main() -> None:
    from autowisp.simulate.photometry_night import PhotometryNight, write_photometry_night

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--stars", type=int, default=20000)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench_magfit_"))
    cloudy = tuple(range(5, args.frames, 33))
    night = PhotometryNight(frames=args.frames, stars=args.stars, cloudy=cloudy, seed=3)
    start = time.perf_counter()
    synthetic = write_photometry_night(home / "photometry", night)
    report: dict = {
        "frames": args.frames, "stars": args.stars, "channels": list(night.channels),
        "photometries": len(night.apertures) + 1, "cloudy_frames": len(cloudy),
        "write_seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    report["ours"] = _ours(home, synthetic, night)
    if not args.no_peer:
        report["peer"] = _peer(synthetic, night)
        report["time_ratio"] = round(report["ours"]["seconds"] / report["peer"]["seconds"], 3)
        report["memory_ratio"] = round(report["ours"]["peak_mb"] / report["peer"]["peak_mb"], 3)
    tables = {name: report[name].pop("precision") for name in ("ours", "peer") if name in report}
    print(json.dumps(report, indent=1))
    print("median RMS / theory (middle aperture) per channel and magnitude bin:")
    print("channel  bin     stars  ours   peer")
    for i, (channel, bin_, stars, ratio) in enumerate(tables["ours"]):
        peer = tables["peer"][i][3] if "peer" in tables else float("nan")
        print(f"{channel:7s}  {bin_:6s}  {stars:5d}  {ratio:5.3f}  {peer:5.3f}")


if __name__ == "__main__":
    main()
