"""photometry: PSF/PRF fits and aperture photometry of every catalogue star on a frame.

Reads the calibrated frame (with its error image and mask) and the frame's astrometric
solution, whose ``CATALOGUE`` table lists the field's stars projected through the WCS;
measures the channels of the mosaic with :func:`autowisp.core.photometry.measure_mosaic`
(the position correction fitted to all channels' shape stars, the PSF map, PSF-fitting
fluxes, PRF-weighted or exact-area apertures) and writes one
HDF5 file (:mod:`autowisp.io.photometry`). Median FWHM and ellipticity per channel, the
stars measured and the fit χ²/dof go to the task row.
"""

from __future__ import annotations

import numpy as np

from autowisp.core.bayer import channels
from autowisp.core.photometry import PhotometryConfig, bad_codes, measure_mosaic
from autowisp.errors import PermanentError
from autowisp.io.photometry import GROUP_OF, FramePhotometry, write_frame_photometry
from autowisp.io.products import read_calibrated_frame
from autowisp.io.provenance import Provenance
from autowisp.io.solution import read_astrometric_solution
from autowisp.steps.base import Parameter, Step, StepContext, StepResult
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


class Photometry(Step):
    name = "photometry"
    outputs = ("frame_photometry",)
    scope = Scope.IMAGE
    inputs = ("calibrate", "astrometry")
    image_types = frozenset({ImageType.OBJECT})
    version = "4"  # 2: numba PSF shape fits, far-pixel quadrature, psf_model; 3: positions;
    # 4: the position correction pooled over the channels
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
            "annulus", "0,0", "px", "Background annulus inner,outer; 0,0: beyond the apertures."
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
        catalogue = solution.catalogue
        x = np.asarray(catalogue["x"], float)
        y = np.asarray(catalogue["y"], float)
        mag = np.asarray(catalogue["g"], float)
        fwhm = float(solution.qc.get("fwhm_px") or 2.5)
        if not np.isfinite(fwhm) or fwhm <= 0.5:
            fwhm = 2.5
        unmatched = np.asarray(solution.sources["source_id"]) < 0
        others = (np.asarray(solution.sources["x"], float)[unmatched],
                  np.asarray(solution.sources["y"], float)[unmatched])  # fmt: skip
        data = np.asarray(frame.image, float)
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
        qc["uncalibrated"] = bool(frame.uncalibrated)
        product = FramePhotometry(
            source_id=np.asarray(catalogue["source_id"], np.int64),
            x=x,
            y=y,
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
                calibrated=calibrated, astrometry=solved,
            ),
        )  # fmt: skip
        path = context.output_path("h5")
        write_frame_photometry(path, product)
        return StepResult(path, qc)
