"""Benchmark extraction and solving on the PANOPTES crop and a full-size simulated frame.

Extraction, on the same image in the same run:
- ours: ``autowisp.core.extraction.extract_sources`` (per-channel background, sep
  detection, windowed centroids);
- sep: ``sep.Background`` + ``sep.extract`` on the whole frame (no Bayer handling);
- photutils: ``Background2D`` + ``DAOStarFinder`` (FWHM 2.5 px, 5σ).

Solving, on our extracted sources: ours with the header pointing against
``solve-field`` with the same pointing, radius and scale range (``--ra --dec --radius
--scale-low/high``) on the same source list. solve-field needs
``apt-get install astrometry.net astrometry-data-tycho2-10-19``.

Usage (from the repository root): python -m benchmarks.bench_astrometry
(reads tests/data/panoptes; photutils: pip install photutils).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from autowisp.core.astrometry import solve
from autowisp.core.extraction import extract_sources
from autowisp.io.catalogue import OfflineGaia
from autowisp.io.solve_field import find_solve_field, solve_field

PANOPTES = Path(__file__).resolve().parents[1] / "tests" / "data" / "panoptes"


def _best_of(function, repeats: int = 3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def _sep(image):
    import sep

    data = np.ascontiguousarray(image, dtype=np.float64)
    back = sep.Background(data)
    return sep.extract(data - back.back(), 5.0, err=back.globalrms, minarea=5)


def _photutils(image):
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MedianBackground
    from photutils.detection import DAOStarFinder

    back = Background2D(image, 64, filter_size=3, sigma_clip=SigmaClip(3.0),
                        bkg_estimator=MedianBackground())  # fmt: skip
    finder = DAOStarFinder(fwhm=2.5, threshold=5.0 * float(np.median(back.background_rms)))
    return finder(image - back.background)


def _frames() -> list[tuple[str, np.ndarray, tuple[float, float], float, np.ndarray | None]]:
    frames = []
    raw = fits.getdata(PANOPTES / "unsolved.fits").astype(float)
    header = fits.getheader(PANOPTES / "unsolved.fits")
    frames.append(("PANOPTES 700x700 crop", raw, (header["RA-MNT"], header["DEC-MNT"]), 10.3,
                   raw >= header["WHTLVLN"]))  # fmt: skip
    from autowisp.simulate.night import NightConfig, simulate_night

    with tempfile.TemporaryDirectory() as scratch:
        simulate_night(
            Path(scratch),
            NightConfig(frames=1, width=5184, height=3456, seed=2, biases=0, darks=0, flats=0,
                        cloudy_fraction=0.0),
        )  # fmt: skip
        path = next(Path(scratch).rglob("object_0001.fits"))
        data = fits.getdata(path).astype(float)
        head = fits.getheader(path)
    frames.append(("simulated 5184x3456", data, (head["RA-MNT"], head["DEC-MNT"]), 10.3,
                   data >= head["SATURATE"]))  # fmt: skip
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    success_counts()
    have_solve_field = find_solve_field() is not None
    for name, image, hint, scale, saturated in _frames():
        print(f"== {name}")
        ours_t, sources = _best_of(
            lambda image=image, saturated=saturated: extract_sources(
                image, "RGGB", saturated=saturated
            ),
            args.repeats,
        )
        sep_t, sep_found = _best_of(lambda image=image: _sep(image), args.repeats)
        print(f"extraction: ours {ours_t:.3f} s ({len(sources)} sources), "
              f"sep {sep_t:.3f} s ({len(sep_found)}), ratio {ours_t / sep_t:.2f}")  # fmt: skip
        try:
            pu_t, pu_found = _best_of(lambda image=image: _photutils(image), 1)
            count = 0 if pu_found is None else len(pu_found)
            print(f"            photutils {pu_t:.3f} s ({count}); photutils/ours "
                  f"{pu_t / ours_t:.1f}x")  # fmt: skip
        except ImportError:
            print("            photutils not installed")
        ny, nx = image.shape
        half_diagonal = 0.5 * np.hypot(nx, ny) * scale * 1.2 / 3600
        OfflineGaia().cone(0.0, 0.0, 1.0, epoch=2020.0)  # load the catalogue once

        def ours(image=image, sources=sources, hint=hint, scale=scale, radius=half_diagonal):
            # The catalogue cone is part of the time, as loading its index is solve-field's.
            catalogue = OfflineGaia().cone(hint[0], hint[1], 10.0 + radius, epoch=2020.0)
            return solve(sources.x, sources.y, catalogue.ra, catalogue.dec, image.shape,
                         hint=hint, pixel_scale=scale)  # fmt: skip

        solve_t, solution = _best_of(ours, args.repeats)
        print(f"solve (hint): ours {solve_t:.3f} s with the cone search, {solution.matched} stars, "
              f"RMS {solution.rms_px:.3f} px, offset {solution.pointing_offset_deg:.2f} deg")  # fmt: skip
        if have_solve_field:
            try:
                sf_t, sf = _best_of(
                    lambda image=image, sources=sources, hint=hint, scale=scale, half_diagonal=half_diagonal: solve_field(
                        sources.x, sources.y, image.shape, pixel_scale=scale, hint=hint,
                        hint_radius=10.0 + half_diagonal,
                    ),
                    args.repeats,
                )  # fmt: skip
                centre = solution.wcs.pixel_to_sky(np.array(nx / 2), np.array(ny / 2))
                sx, sy = sf.sky_to_pixel(centre[0], centre[1])
                print(f"             solve-field {sf_t:.3f} s (centre agrees to "
                      f"{np.hypot(sx - nx / 2, sy - ny / 2):.2f} px); solve-field/ours "
                      f"{sf_t / solve_t:.1f}x")  # fmt: skip
            except Exception as error:
                print(f"             solve-field failed: {error}")
        else:
            print("             solve-field not installed")


def success_counts(frames: int = 20, seed: int = 3) -> None:
    """Solve every object frame of a simulated 1024×768 night (30 % cloudy) from its raw
    file: the header pointing, the pixel scale its FOCALLEN and XPIXSZ imply; count the
    successes and compare catalogue positions with the true positions."""
    from autowisp.io.keywords import header_pixel_scale
    from autowisp.simulate.night import NightConfig, simulate_night
    from autowisp.simulate.truth import read_truth

    with tempfile.TemporaryDirectory() as scratch:
        simulate_night(
            Path(scratch),
            NightConfig(frames=frames, width=1024, height=768, seed=seed, biases=0, darks=0,
                        flats=0, cloudy_fraction=0.3),
        )  # fmt: skip
        truth = read_truth(next(Path(scratch).rglob("truth.h5")))
        paths = sorted(Path(scratch).rglob("object_*.fits"))
        solved = {True: [0, 0], False: [0, 0]}
        errors, times = [], []
        catalogue = OfflineGaia()
        for index, path in enumerate(paths):
            data = fits.getdata(path).astype(float)
            header = fits.getheader(path)
            cloudy = bool(truth.object["cloudy"][index])
            solved[cloudy][1] += 1
            sources = extract_sources(data, "RGGB", saturated=data >= header["SATURATE"])
            hint = (header["RA-MNT"], header["DEC-MNT"])
            start = time.perf_counter()
            stars = catalogue.cone(*hint, 11.0, epoch=2024.7)
            try:
                solution = solve(sources.x, sources.y, stars.ra, stars.dec, data.shape,
                                 hint=hint, pixel_scale=header_pixel_scale(header))  # fmt: skip
            except ValueError as error:
                print(f"  {path.name}: {error}")
                continue
            times.append(time.perf_counter() - start)
            solved[cloudy][0] += 1
            signal = np.nansum(truth.object["aperture_signal"][index, :, :, 1], axis=1)
            noise = np.sqrt(np.nansum(truth.object["aperture_sigma"][index, :, :, 1] ** 2, 1))
            with np.errstate(invalid="ignore", divide="ignore"):
                bright = truth.object["rendered"][index] & (signal / noise > 100)
            x, y = solution.wcs.sky_to_pixel(truth.stars["ra"][bright], truth.stars["dec"][bright])
            errors.append(np.hypot(x - truth.object["x"][index][bright],
                                   y - truth.object["y"][index][bright]))  # fmt: skip
    error = np.concatenate(errors) if errors else np.zeros(0)
    print(f"== simulated night, {len(paths)} frames of 1024x768")
    print(f"solved: clear {solved[False][0]}/{solved[False][1]}, "
          f"cloudy {solved[True][0]}/{solved[True][1]}; median solve (with cone) "
          f"{np.median(times):.3f} s")  # fmt: skip
    print(f"catalogue positions vs truth, S/N>100 ({error.size} star-frames): RMS "
          f"{np.sqrt(np.mean(error**2)):.4f} px, max {error.max():.3f} px")  # fmt: skip


if __name__ == "__main__":
    main()
