"""photometry: PSF/PRF fits and aperture photometry of every star of the field on a frame.

Reads the calibrated frame (with its error image and mask), the frame's astrometric
solution and the night's star list (``star_list``: the catalogue's stars and those
beyond it that the night's deep stack found). The stars measured are the list's stars
of the frame's field, projected through the frame's WCS, that fall on the frame, and the
solution's catalogue stars (its ``CATALOGUE`` table, projected through the same WCS) the
list does not hold (a frame dithered off the list's reference frame). Without a star
list (its task died: the frame is measured anyway) or a field, the catalogue's stars
alone. Each star's magnitude, which orders the PSF map's shape stars and is a term of
the map, is the catalogue's G or, for a star beyond it, its instrumental magnitude on
the stack moved to G by the median offset of the listed catalogue stars.

Then measures the channels of the mosaic with
:func:`autowisp.core.photometry.measure_mosaic` (the position correction fitted to all
channels' shape stars, the PSF map, PSF-fitting fluxes, PRF-weighted or exact-area
apertures) and writes one HDF5 file (:mod:`autowisp.io.photometry`). Median FWHM and
ellipticity per channel, the stars measured (from the list, beyond the catalogue) and
the fit χ²/dof go to the task row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from autowisp.core.bayer import channels
from autowisp.core.photometry import ANNULUS_AREA, PhotometryConfig, bad_codes, measure_mosaic
from autowisp.errors import PermanentError
from autowisp.io.night_star_list import read_star_list
from autowisp.io.photometry import GROUP_OF, FramePhotometry, write_frame_photometry
from autowisp.io.products import read_calibrated_frame
from autowisp.io.provenance import Provenance
from autowisp.io.solution import AstrometricSolution, read_astrometric_solution
from autowisp.steps.base import Input, Kind, Parameter, Step, StepContext, StepResult
from autowisp.vocabulary import ImageType, Scope

__all__ = ["Photometry"]


def _radii(text: str) -> tuple[float, ...]:
    try:
        radii = tuple(float(v) for v in str(text).replace(";", ",").split(",") if v.strip())
    except ValueError as error:
        raise PermanentError(
            f"[steps.photometry] apertures must be comma-separated radii in px, got {text!r}"
        ) from error
    if not radii or min(radii) <= 0:
        raise PermanentError(f"[steps.photometry] apertures must be positive, got {text!r}")
    return radii


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise PermanentError(
        f"[steps.photometry] refine_positions must be true or false, got {value!r}"
    )


def _finite(value: object) -> float | None:
    """A QC figure for the task row's JSON (no NaN: PostgreSQL's JSON refuses it)."""
    if isinstance(value, (int, float)) and np.isfinite(value):
        return float(value)
    return None


#: Unmatched detections of the frame this close to a measured star are that star (px):
#: the rest are the "others" whose light the fits take out.
SAME_SOURCE_PX = 1.5


@dataclass(frozen=True)
class FrameStars:
    """The stars a frame's photometry measures (arrays of one length): the WCS-projected
    position, the magnitude that orders them, the Gaia id (-1: none), the sky position,
    the row of the night's star list (-1: a catalogue star the list does not hold) and
    the list's flags."""

    x: np.ndarray
    y: np.ndarray
    mag: np.ndarray
    source_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    list_row: np.ndarray
    flags: np.ndarray
    field_id: int | None
    from_list: int
    beyond_catalogue: int


def frame_stars(
    solution: AstrometricSolution,
    shape: tuple[int, int],
    star_list_path: Path | None,
    field_id: int | None,
) -> FrameStars:
    """The stars to measure on a frame of ``shape`` (rows, columns) with ``solution``:
    the star list's stars of ``field_id`` on the frame, then the solution's catalogue
    stars the list does not hold."""
    catalogue = solution.catalogue
    cat_id = np.asarray(catalogue["source_id"], np.int64)
    cat = {
        "x": np.asarray(catalogue["x"], float),
        "y": np.asarray(catalogue["y"], float),
        "mag": np.asarray(catalogue["g"], float),
        "source_id": cat_id,
        "ra": np.asarray(catalogue["ra"], float),
        "dec": np.asarray(catalogue["dec"], float),
        "list_row": np.full(cat_id.size, -1, np.int64),
        "flags": np.zeros(cat_id.size, np.int64),
    }
    listed = None
    if star_list_path is not None and field_id is not None:
        for candidates in read_star_list(star_list_path).fields:
            if candidates.field_id == field_id:
                listed = candidates
    if listed is None or len(listed) == 0:
        return FrameStars(**cat, field_id=field_id, from_list=0, beyond_catalogue=0)
    columns = listed.columns
    ra = np.asarray(columns["ra"], float)
    dec = np.asarray(columns["dec"], float)
    x, y = solution.wcs.sky_to_pixel(ra, dec)
    rows, columns_ = shape
    inside = np.flatnonzero(
        np.isfinite(x) & (x > -0.5) & (x < columns_ - 0.5) & (y > -0.5) & (y < rows - 0.5)
    )
    gaia = np.asarray(columns["gaia_source_id"], np.int64)[inside]
    mag = np.asarray(columns["g"], float)[inside]
    # A star beyond the catalogue: its instrumental magnitude (mean over the channels)
    # moved to G by the median offset of the listed catalogue stars.
    instrumental = np.full(inside.size, np.nan)
    if listed.instrumental:
        stacked = np.vstack([np.asarray(v, float)[inside] for v in listed.instrumental.values()])
        finite = np.isfinite(stacked)
        counts = finite.sum(axis=0)
        sums = np.where(finite, stacked, 0.0).sum(axis=0)
        instrumental = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    both = np.isfinite(mag) & np.isfinite(instrumental)
    offset = float(np.median(mag[both] - instrumental[both])) if both.any() else 0.0
    unknown = ~np.isfinite(mag)
    mag[unknown] = instrumental[unknown] + offset
    # Still unknown (catalogue-only rows without G, unmeasured): the faintest known.
    known = np.isfinite(mag)
    mag[~known] = float(np.max(mag[known])) if known.any() else 15.0
    extra = ~np.isin(cat_id, gaia[gaia >= 0]) | (cat_id < 0)
    stars = {
        "x": np.concatenate([x[inside], cat["x"][extra]]),
        "y": np.concatenate([y[inside], cat["y"][extra]]),
        "mag": np.concatenate([mag, cat["mag"][extra]]),
        "source_id": np.concatenate([gaia, cat_id[extra]]),
        "ra": np.concatenate([ra[inside], cat["ra"][extra]]),
        "dec": np.concatenate([dec[inside], cat["dec"][extra]]),
        "list_row": np.concatenate([inside.astype(np.int64), cat["list_row"][extra]]),
        "flags": np.concatenate(
            [np.asarray(columns["flags"], np.int64)[inside], cat["flags"][extra]]
        ),
    }
    return FrameStars(
        **stars,
        field_id=field_id,
        from_list=int(inside.size),
        beyond_catalogue=int((gaia < 0).sum()),
    )


class Photometry(Step):
    name = "photometry"
    outputs = ("frame_photometry",)
    scope = Scope.IMAGE
    inputs = ("calibrate", "astrometry", Input("star_list", Kind.AFTER))
    image_types = frozenset({ImageType.OBJECT})
    version = "6"  # 2: numba PSF shape fits, far-pixel quadrature, psf_model; 3: positions;
    # 4: the position correction pooled over the channels; 5: the night's star list;
    # 6: the default annulus ANNULUS_AREA times the largest aperture's area
    parameters = (
        Parameter("apertures", "2,3,4,5", "px", "Aperture radii, comma-separated."),
        Parameter(
            "mode",
            "prf",
            "",
            "'prf': each pixel weighted by PSF × sub-pixel sensitivity over its exact overlap "
            "with the aperture; 'plain': exact-area circular sums.",
        ),
        Parameter(
            "psf_profile",
            "auto",
            "",
            "'gaussian', 'moffat' (β 3.5) or 'auto' (Moffat, β the median of the brightest "
            "stars' own fits; Gaussian past β 10).",
        ),
        Parameter(
            "psf_model",
            "analytic",
            "",
            "PSF fluxes from 'analytic' (the elliptical profile's smooth map) or 'bicubic' "
            "(a piecewise bicubic map fitted per channel; on a Bayer channel its cells are "
            "the 2×2 super-pixel: see autowisp.core.bicubic).",
        ),
        Parameter(
            "refine_positions",
            True,
            "",
            "Correct the WCS-projected positions by a smooth polynomial fitted to the "
            "offsets of the PSF fits' centres of all channels' shape stars (order 2 from 64 "
            "stars, 1 from 32, a shift from 16; fits of chi2/dof > 3 left out), with a "
            "constant shift per channel (8 stars or more each) where the "
            "offsets call for one; false: measure at the projected positions.",
        ),
        Parameter("shape_stars", 150, "", "Brightest isolated stars that shape the PSF map."),
        Parameter("shape_order_xy", 3, "", "Polynomial order of the PSF map in x and y."),
        Parameter("shape_order_mag", 1, "", "Polynomial order of the PSF map in magnitude."),
        Parameter(
            "annulus",
            "0,0",
            "px",
            "Background annulus inner,outer; 0: 2 FWHM beyond the largest "
            f"aperture, and {ANNULUS_AREA:g} times its area.",
        ),
    )

    def run(self, context: StepContext) -> StepResult:
        image = context.require_image()
        calibrated, calibrated_path = context.require_input("calibrate", "calibrated frame")
        solved, solved_path = context.require_input("astrometry", "astrometric solution")
        parameters = context.parameters
        try:
            annulus = [float(v) for v in str(parameters["annulus"]).split(",")]
        except ValueError as error:
            raise PermanentError(
                f"[steps.photometry] annulus must be 'inner,outer' in px, got "
                f"{parameters['annulus']!r}"
            ) from error
        if len(annulus) != 2:
            raise PermanentError(
                f"[steps.photometry] annulus must be 'inner,outer' in px, got "
                f"{parameters['annulus']!r}"
            )
        try:
            config = PhotometryConfig(
                apertures=_radii(str(parameters["apertures"])),
                mode=str(parameters["mode"]),
                profile=str(parameters["psf_profile"]),
                shape_stars=int(parameters["shape_stars"]),
                shape_order_xy=int(parameters["shape_order_xy"]),
                shape_order_mag=int(parameters["shape_order_mag"]),
                annulus=(float(annulus[0]), float(annulus[-1])),
                psf_model=str(parameters["psf_model"]),
                refine_positions=_boolean(parameters["refine_positions"]),
            )
        except ValueError as error:
            raise PermanentError(f"[steps.photometry]: {error}") from error
        frame = read_calibrated_frame(calibrated_path, storage_root=context.storage_root)
        solution = read_astrometric_solution(solved_path)
        listed = context.inputs.get("star_list", ())
        star_list = listed[0] if listed and listed[0].output_path is not None else None
        data = np.asarray(frame.image, float)
        stars = frame_stars(
            solution,
            (data.shape[0], data.shape[1]),
            Path(str(star_list.output_path)) if star_list is not None else None,
            image.field_id,
        )
        x, y, mag = stars.x, stars.y, stars.mag
        fwhm = float(solution.qc.get("fwhm_px") or 2.5)
        if not np.isfinite(fwhm) or fwhm <= 0.5:
            fwhm = 2.5
        # The frame's detections that are none of the measured stars: their light is
        # fitted with them (neighbours beyond the list: faint, or on this frame only).
        unmatched = np.asarray(solution.sources["source_id"]) < 0
        other_x = np.asarray(solution.sources["x"], float)[unmatched]
        other_y = np.asarray(solution.sources["y"], float)[unmatched]
        if other_x.size and x.size:
            distance, _ = cKDTree(np.column_stack([x, y])).query(
                np.column_stack([other_x, other_y])
            )
            alone = distance > SAME_SOURCE_PX
            other_x, other_y = other_x[alone], other_y[alone]
        others = (other_x, other_y)
        error_image = np.asarray(frame.error, float)
        bad = bad_codes(frame.mask)
        results = {}
        qc: dict[str, dict[str, float | str | None] | float | int | bool] = {}
        mosaic = channels(frame.layout)
        measured = measure_mosaic(
            data, error_image, bad, mosaic, x, y, mag, config=config, fwhm_guess=fwhm,
            uncalibrated=frame.uncalibrated, others=others,
        )  # fmt: skip
        for channel, result in zip(mosaic, measured, strict=True):
            results[channel.name] = result
            figures: dict[str, float | str | None] = {
                key: _finite(result.qc.get(key))
                for key in (
                    "fwhm",
                    "ellipticity",
                    "measured",
                    "psf_chi2",
                    "shape_stars",
                    "position_stars",
                    "position_shift_rms",
                    "position_residual_rms",
                )
            }
            figures["psf_model"] = str(result.qc.get("psf_model", "analytic"))
            qc[GROUP_OF.get(channel.name, channel.name)] = figures
        qc["stars"] = int(x.size)
        qc["stars_from_list"] = stars.from_list
        qc["beyond_catalogue"] = stars.beyond_catalogue
        qc["star_list"] = star_list is not None
        qc["uncalibrated"] = bool(frame.uncalibrated)
        product = FramePhotometry(
            source_id=stars.source_id,
            x=x,
            y=y,
            ra=stars.ra,
            dec=stars.dec,
            list_row=stars.list_row,
            star_flags=stars.flags,
            field_id=stars.field_id,
            channels=results,
            apertures=tuple(sorted(config.apertures)),
            mode=config.mode,
            layout=frame.layout,
            raw_file=image.path.name,
            date_obs=image.date_obs.isoformat(),
            exptime=float(image.exptime),
            qc=qc,
            provenance=Provenance.of(
                context, version=self.version, uncalibrated=frame.uncalibrated,
                calibrated=calibrated, astrometry=solved, star_list=star_list,
            ),
        )  # fmt: skip
        path = context.output_path("h5")
        write_frame_photometry(path, product)
        return StepResult(path, qc)
