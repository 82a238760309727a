"""Magnitude fitting of a night: every frame's photometry tied to one master reference.

A barrier over the night's photometry. Per field the night's frames belong to, per
channel and per photometry (each aperture, and the PSF fluxes), with
:mod:`autowisp.core.magfit`:

1. **Stars.** The union of the frames' stars: a star of the night's star list by its
   row there, a catalogue star the list lacks by its Gaia id. Each frame's magnitudes,
   ``−2.5 log10(e⁻/s)``, go into the product's frames × stars arrays; a measurement a
   :data:`autowisp.core.photometry.SPOILING` flag marks (saturated, masked, on the
   edge, ...) is not used.
2. **Reference frame.** Chosen automatically for the sharpest PSF, the darkest sky, the
   most measured stars and the lowest airmass (the rank quantile of each, merit
   ``1/(Σq² + 0.01)``); the choice and its figures are recorded in the product and in
   the task's QC.
3. **Fits.** Each frame's ``ref − mag`` fitted by the ``expression`` (default: the
   original's 20 monomials of order ≤ 3 in the magnitude and position, plus a colour term
   and its change with airmass, which a wide field of a colour camera needs: the
   extinction of a star depends on its colour and on its own airmass, and both change
   across the frame). Variables: ``mag`` (the star's magnitude on the reference in that
   channel), ``x``, ``y`` (position scaled to [−1, 1] over the field), ``colour`` (the
   reference's instrumental R − B, colour cameras only), ``airmass`` (the star's own, from
   the header's site and the frame's mid-exposure; without a site the terms with
   airmass are left out and the product says so), and ``cx``, ``sx``, ``cy``, ``sy``
   (cos and sin of 2π times the star's place within its channel's cell, for sub-pixel
   terms such as ``O1{cx, sx, cy, sy}``: on the simulated 60-frame night they moved the
   scatter by ≤ 0.03 of the noise, so the default leaves them out). On a frame whose
   residuals show a pattern over a 6 × 6 grid, the finer spatial terms ``O6{x, y}``,
   ``O9{x, y}``, ``O12{x, y}`` are tried in turn (``cloud_order``) and kept while the
   information criterion drops: a partial cloud.
4. **Master.** The corrected magnitudes' rejected median per star, variables and stars
   seen on fewer than half the frames left out, and the fits repeated against it until it
   changes by less than ``convergence`` mag² or ``max_iterations`` masters are built.

Memory is bounded: each frame is read once into the product's arrays (in its temporary
file), the fits read one frame at a time, the masters blocks of stars over all frames.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from autowisp.core.magfit import (
    Expression,
    MagfitConfig,
    apply_correction,
    fit_frame_adaptive,
    master_block,
    parse_expression,
    reference_merit,
    star_airmass,
    variable_stars,
)
from autowisp.core.photometry import SPOILING
from autowisp.errors import PermanentError
from autowisp.io.atomic import atomic_path
from autowisp.io.magfit import CACHE_BYTES, create_channel, create_field, photometry_names
from autowisp.io.night_star_list import field_star_indices
from autowisp.io.photometry import GROUP_OF, read_frame_photometry
from autowisp.io.provenance import Provenance, product_reference, reference_path, stamp
from autowisp.steps.base import ImageInfo, InputProduct, Parameter, Step, StepContext, StepResult
from autowisp.vocabulary import ImageType, Scope

__all__ = ["Magfit", "star_keys"]

#: Orders of the finer spatial terms tried on a frame, in turn, up to ``cloud_order``: a
#: partial cloud on a synthetic night (a Gaussian blob of 0.4 mag, σ a sixth of the
#: frame) left 10-13 mmag of residual at order 6, 4-5 at 8, 0.2-0.3 at 10-12.
CLOUD_LADDER = (6, 9, 12)

#: The variables an expression may use (see the module docstring).
VARIABLES = frozenset({"mag", "x", "y", "colour", "airmass", "cx", "sx", "cy", "sy"})

PHASES = frozenset({"cx", "sx", "cy", "sy"})

#: Header keywords of the site (as ingest reads them).
_LATITUDE = ("LAT-OBS", "SITELAT", "OBSGEO-B", "LATITUDE")
_LONGITUDE = ("LONG-OBS", "SITELONG", "OBSGEO-L", "LONGITUD")
_HEIGHT = ("ALT-OBS", "SITEELEV", "OBSGEO-H", "ELEVATIO")


def star_keys(list_row: np.ndarray | None, source_id: np.ndarray) -> np.ndarray:
    """A night's identity of each star of a photometry file: its row in the night's star
    list (≥ 0), else ``−1 − source_id`` (a catalogue star the list does not hold)."""
    source = np.asarray(source_id, np.int64)
    if list_row is None:
        return -1 - source
    rows = np.asarray(list_row, np.int64)
    return np.where(rows >= 0, rows, -1 - source)


def _number(header: Any, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = header.get(key)
        if value in (None, ""):
            continue
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


@dataclass
class _Frame:
    image: ImageInfo
    product: InputProduct
    path: Path


class Magfit(Step):
    name = "magfit"
    scope = Scope.NIGHT
    inputs = ("photometry",)
    outputs = ("magfit",)
    image_types = frozenset({ImageType.OBJECT})
    queue = "heavy"
    night_star_rows = True
    parameters = (
        Parameter(
            "expression",
            "O3{mag, x, y} + colour + colour*airmass",
            "",
            "Terms of each frame's correction: '+'-joined products of variables (mag, x, "
            "y, colour, airmass) and O<n>{...} (every monomial of order ≤ n).",
        ),
        Parameter("error_floor", 0.01, "mag", "Added to each point's σ in its weight."),
        Parameter("max_error", 0.1, "mag", "Stars with a larger σ are not fitted."),
        Parameter("rejection", 5.0, "σ", "Residuals beyond this many weighted RMS are rejected."),
        Parameter("max_iterations", 5, "", "Most master references built."),
        Parameter("convergence", 1e-4, "mag²", "Mean-square change of the master that ends it."),
        Parameter(
            "min_frames_fraction", 0.5, "", "A master star needs this fraction of the frames."
        ),
        Parameter(
            "variable_threshold",
            3.0,
            "",
            "A star whose scatter exceeds the scatter–magnitude relation by this many median "
            "excesses is a variable, left out of the fits.",
        ),
        Parameter(
            "cloud_order",
            12,
            "",
            "Spatial terms O<n>{x, y} beyond the expression's tried on each frame and kept "
            "where the information criterion says they follow a pattern the smooth terms "
            "cannot (partial clouds); 0: never.",
        ),
        Parameter("block_mb", 256, "MB", "Memory of one block of stars read over the night."),
    )
    version = "3"

    def run(self, context: StepContext) -> StepResult:
        night = context.require_night()
        parameters = context.parameters
        try:
            expression = parse_expression(str(parameters["expression"]))
        except ValueError as error:
            raise PermanentError(f"[steps.magfit] {error}") from error
        unknown = set(expression.variables) - VARIABLES
        if unknown:
            raise PermanentError(
                f"[steps.magfit] expression {expression.text!r} uses {sorted(unknown)}: the "
                f"variables are {', '.join(sorted(VARIABLES))}"
            )
        config = MagfitConfig(
            error_floor=float(parameters["error_floor"]),
            max_error=float(parameters["max_error"]),
            rejection=float(parameters["rejection"]),
            max_iterations=int(parameters["max_iterations"]),
            convergence=float(parameters["convergence"]),
            min_frames_fraction=float(parameters["min_frames_fraction"]),
            variable_threshold=float(parameters["variable_threshold"]),
        )
        if config.max_iterations < 1:
            raise PermanentError("[steps.magfit] max_iterations must be at least 1")
        images = {image.id: image for image in night.images}
        by_field: dict[int, list[_Frame]] = defaultdict(list)
        no_field = 0
        for product in context.inputs.get("photometry", ()):
            image = images.get(product.image_id or -1)
            if image is None or product.output_path is None:
                continue
            if image.field_id is None:
                no_field += 1
                continue
            by_field[image.field_id].append(_Frame(image, product, Path(product.output_path)))
        qc: dict[str, Any] = {"frames_without_field": no_field, "fields": {}, "frames": {}}
        if not by_field:
            qc["empty_because"] = f"no photometry of a frame with a field ({no_field} without)"
        path = context.output_path("h5")
        provenance = Provenance.of(context, version=self.version)
        block_bytes = max(int(float(parameters["block_mb"]) * 1024**2), 1024**2)
        with (
            atomic_path(path) as temporary,
            h5py.File(temporary, "w", rdcc_nbytes=CACHE_BYTES) as out,
        ):
            stamp(out.attrs, provenance)
            out.attrs["expression"] = expression.text
            names = []
            for field_id, frames in sorted(by_field.items()):
                figures, per_frame = _fit_field(
                    out, context, field_id, frames, expression, config, block_bytes
                )
                names.append(f"FIELD{field_id}")
                qc["fields"][str(field_id)] = figures
                qc["frames"].update(per_frame)
            out.attrs["fields"] = ",".join(names)
            out.attrs["qc"] = json.dumps(qc, default=float, allow_nan=True)
        return StepResult(path, qc)


def _fit_field(
    out: h5py.File,
    context: StepContext,
    field_id: int,
    frames: list[_Frame],
    expression: Expression,
    config: MagfitConfig,
    block_bytes: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    frames = sorted(frames, key=lambda f: (f.image.jd, f.image.path.name))
    notes: list[str] = []
    # The stars: the union of the frames' (read the small columns first).
    first = read_frame_photometry(frames[0].path)
    apertures, channel_names = first.apertures, list(first.channels)
    kept: list[_Frame] = []
    star_list = ""  # the star list the frames were measured with (their rows are its)
    # The union so far, first occurrences kept: memory of the stars, not of the frames.
    union = {
        "key": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0),
        "source_id": np.zeros(0, np.int64), "list_row": np.zeros(0, np.int64),
    }  # fmt: skip
    for frame in frames:
        with h5py.File(frame.path, "r") as source:
            names = [n for n in str(source.attrs["channels"]).split(",") if n]
            same = tuple(float(v) for v in source.attrs["apertures"]) == apertures
            if not names or not same or names != [GROUP_OF.get(c, c) for c in channel_names]:
                notes.append(
                    f"{frame.image.path.name}: left out, its channels or apertures differ "
                    "from the night's first frame's"
                )
                continue
            listed = Provenance.read(source.attrs).references.get("STARLIST", "")
            if kept and listed != star_list:
                notes.append(
                    f"{frame.image.path.name}: left out, measured with another star list "
                    f"({listed or 'none'}) than the night's first frame ({star_list or 'none'})"
                )
                continue
            star_list = listed
            group = source[names[0]]
            list_row = np.asarray(group["list_row"]) if "list_row" in group else None
            source_id = np.asarray(group["source_id"])
            size = len(source_id)
            new = {
                "key": star_keys(list_row, source_id),
                "ra": np.asarray(group["ra"]) if "ra" in group else np.full(size, np.nan),
                "dec": np.asarray(group["dec"]) if "dec" in group else np.full(size, np.nan),
                "source_id": source_id,
                "list_row": list_row if list_row is not None else np.full(size, -1),
            }
        _, first_index = np.unique(np.concatenate([union["key"], new["key"]]), return_index=True)
        union = {k: np.concatenate([union[k], new[k]])[first_index] for k in union}
        kept.append(frame)
    frames = kept
    if not frames:
        raise PermanentError(f"field {field_id}: no frame's photometry can be fitted")
    keys = union["key"]  # sorted: where each frame's stars go is found by bisection
    # The columns in the field's star order where the database knows it (the light-curve
    # shards then read runs of neighbouring columns), the stars it does not know after.
    column_of = np.arange(keys.size)
    night_rows = context.night.star_rows.get(field_id, {}) if context.night else {}
    rows = night_rows.get(reference_path(star_list)) if star_list else None
    if rows is not None and rows[0].size and keys.size:
        star_index = field_star_indices(union["list_row"], rows)
        star_index[star_index < 0] = np.iinfo(np.int64).max  # unknown stars last
        by_star = np.lexsort((keys, star_index))
        union = {k: v[by_star] for k, v in union.items()}
        column_of = np.empty(keys.size, np.int64)
        column_of[by_star] = np.arange(keys.size)
    n_frames, n_stars = len(frames), keys.size
    photometries = photometry_names(apertures)
    n_phot = len(photometries)
    # Site for the stars' airmass.
    header = frames[0].image.header
    latitude, longitude = _number(header, _LATITUDE), _number(header, _LONGITUDE)
    height = _number(header, _HEIGHT)
    if "airmass" in expression.variables and (latitude is None or longitude is None):
        expression = expression.without(["airmass"])
        notes.append("no site in the headers (LAT-OBS/LONG-OBS): terms with airmass left out")
    groups = [GROUP_OF.get(c, c) for c in channel_names]
    if "colour" in expression.variables and not {"R", "B"} <= set(groups):
        expression = expression.without(["colour"])
        notes.append("no R and B channels (a mono camera): terms with colour left out")
    if not expression.terms:
        raise PermanentError(f"field {field_id}: the expression leaves no term to fit")
    order = int(context.parameters.get("cloud_order", 0))
    extra = Expression("", ())
    levels: list[int] = []
    for step in sorted({min(o, order) for o in CLOUD_LADDER if order > 0}):
        finer = parse_expression(f"O{step}{{x, y}}")
        added = tuple(t for t in finer.terms if t not in expression.terms + extra.terms)
        extra = Expression(f"O{step}{{x, y}}", extra.terms + added)
        levels.append(len(extra.terms))
    terms = expression.terms + extra.terms
    star_ra, star_dec = union["ra"], union["dec"]
    group = create_field(
        out,
        field_id,
        frames={
            "raw_file": [f.image.path.name for f in frames],
            "photometry_file": [
                product_reference(f.product, context.storage_root) for f in frames
            ],
            "jd_mid": [f.image.jd for f in frames],
            "exptime": [f.image.exptime for f in frames],
        },
        stars={
            "source_id": union["source_id"],
            "list_row": union["list_row"],
            "ra": star_ra,
            "dec": star_dec,
        },
    )
    group.attrs["star_list"] = star_list
    group.attrs["site"] = json.dumps(
        {"latitude": latitude, "longitude": longitude, "height": height}
    )
    datasets = {g: create_channel(group, g, n_frames, n_stars, n_phot, len(terms)) for g in groups}
    # Fill the frames × stars arrays, one frame at a time; gather the reference criteria.
    fwhm = np.full(n_frames, np.nan)
    background = np.full(n_frames, np.nan)
    measured = np.zeros(n_frames)
    airmass_centre = np.full(n_frames, np.nan)
    x_range = [np.inf, -np.inf]
    y_range = [np.inf, -np.inf]
    middle = len(apertures) // 2
    for i, frame in enumerate(frames):
        product = first if i == 0 else read_frame_photometry(frame.path)
        index = column_of[np.searchsorted(keys, star_keys(product.list_row, product.source_id))]
        exptime = max(float(frame.image.exptime), 1e-9)
        airmass = None
        if latitude is not None and longitude is not None:
            airmass = np.full(n_stars, np.nan, np.float32)
            airmass[index] = star_airmass(
                star_ra[index], star_dec[index], frame.image.jd, latitude, longitude
            )
            up = np.isfinite(airmass[index])
            airmass_centre[i] = float(np.median(airmass[index][up])) if up.any() else np.nan
        widths, skies = [], []
        for name, g in zip(channel_names, groups, strict=True):
            phot = product.channels[name]
            spoiled = (np.asarray(phot.flags) & int(SPOILING)) != 0
            flux = np.column_stack([phot.flux, phot.psf_flux])
            error = np.column_stack([phot.flux_err, phot.psf_flux_err])
            with np.errstate(invalid="ignore", divide="ignore"):
                mag = -2.5 * np.log10(flux / exptime)
                mag_err = 1.0857 * error / flux
            bad = spoiled[:, None] | ~(flux > 0) | ~np.isfinite(mag_err)
            mag[bad], mag_err[bad] = np.nan, np.nan
            row = np.full((n_stars, n_phot), np.nan, np.float32)
            row[index] = mag
            d = datasets[g]
            d["magnitude"][i] = row
            row[index] = mag_err
            d["magnitude_err"][i] = row
            for key, values in (("x", phot.x), ("y", phot.y)):
                line = np.full(n_stars, np.nan, np.float32)
                line[index] = values if values is not None else getattr(product, key)
                d[key][i] = line
            shapes = np.asarray(phot.shapes, float)
            for key, values in (("background", phot.background), ("psf_s", shapes[:, 0]),
                                ("psf_d", shapes[:, 1]), ("psf_k", shapes[:, 2])):  # fmt: skip
                line = np.full(n_stars, np.nan, np.float32)
                line[index] = values
                d[key][i] = line
            flags = np.zeros(n_stars, np.uint16)
            flags[index] = phot.flags
            d["flags"][i] = flags
            if airmass is not None:
                d["airmass"][i] = airmass
            # The channel's FWHM: the file's figures, else the task's.
            task_qc = frame.product.qc.get(g, {}) if isinstance(frame.product.qc, dict) else {}
            width = phot.qc.get("fwhm", task_qc.get("fwhm", np.nan))
            widths.append(float(width) if isinstance(width, (int, float)) else np.nan)
            skies.append(
                float(np.nanmedian(phot.background)) / exptime if len(phot.background) else np.nan
            )
            if g == groups[0]:
                measured[i] = float(
                    np.sum(
                        np.isfinite(mag_err[:, middle]) & (mag_err[:, middle] <= config.max_error)
                    )
                )
        xs = product.x
        if len(xs):
            x_range = [
                min(x_range[0], float(np.nanmin(xs))),
                max(x_range[1], float(np.nanmax(xs))),
            ]
            y_range = [
                min(y_range[0], float(np.nanmin(product.y))),
                max(y_range[1], float(np.nanmax(product.y))),
            ]
        with np.errstate(all="ignore"):
            fwhm[i] = float(np.nanmedian(widths)) if np.isfinite(widths).any() else np.nan
            background[i] = float(np.nanmedian(skies)) if np.isfinite(skies).any() else np.nan
    # The reference frame.
    criteria = {"fwhm": fwhm, "background": background, "stars": -measured}
    if np.isfinite(airmass_centre).any():
        criteria["airmass"] = airmass_centre
    merit, quantiles = reference_merit(criteria)
    r = int(np.argmax(merit))
    reason = (
        f"{frames[r].image.path.name}: best merit of {n_frames} frames "
        f"(FWHM {fwhm[r]:.2f} px, background {background[r]:.3g} e-/px/s, "
        f"{int(measured[r])} stars measured, airmass {airmass_centre[r]:.3f}; rank quantiles "
        + ", ".join(f"{k} {quantiles[k][r]:.2f}" for k in criteria)
        + ")"
    )
    group.attrs["reference_frame"] = frames[r].image.path.name
    group.attrs["reference_reason"] = reason
    # Scaled positions.
    cx, hx = (x_range[0] + x_range[1]) / 2, max((x_range[1] - x_range[0]) / 2, 1.0)
    cy, hy = (y_range[0] + y_range[1]) / 2, max((y_range[1] - y_range[0]) / 2, 1.0)
    block = max(256, int(block_bytes // max(n_frames * n_phot * 8 * 3, 1)))
    blocks = [slice(lo, min(lo + block, n_stars)) for lo in range(0, n_stars, block)]
    # Iteration 0's reference: the reference frame's magnitudes. The magnitude variable
    # of every star: its median over the night moved to the reference's scale, fixed
    # through the iterations (a variable that followed the master would feed the fits'
    # changes back into the master).
    reference: dict[str, np.ndarray] = {}
    known: dict[str, np.ndarray] = {}
    for g in groups:
        ref = np.asarray(datasets[g]["magnitude"][r], float)
        median = np.full((n_stars, n_phot), np.nan)
        for s in blocks:
            values = np.asarray(datasets[g]["magnitude"][:, s], float)
            for p in range(n_phot):
                median[s, p] = master_block(
                    values[:, :, p], MagfitConfig(min_frames_fraction=0.0), n_frames
                ).magnitude
        with np.errstate(invalid="ignore"):
            offset = np.nanmedian(ref - median, axis=0)
        variable_mag = median + np.nan_to_num(offset)
        reference[g] = ref
        known[g] = variable_mag
    star_terms = Expression(
        "star terms", tuple(t for t in expression.terms if {n for n, _ in t} <= {"mag", "colour"})
    )
    changes: list[float] = []
    fit_figures: dict[str, Any] = {}
    variable_masks = {g: np.zeros((n_stars, n_phot), bool) for g in groups}
    # The magnitude variables are fixed through the iterations, and so is the colour.
    colour = _colour(known) if "colour" in expression.variables else None
    iterations = 0
    for iterations in range(1, config.max_iterations + 1):
        for g in groups:
            _fit_frames(datasets[g], reference[g], known[g], colour, expression, extra,
                        levels, config, (cx, hx, cy, hy), n_frames,
                        1 if g == "MONO" else 2, column_of)  # fmt: skip
        change = 0.0
        for g in groups:
            d = datasets[g]
            master = np.full((n_stars, n_phot), np.nan)
            scatter = np.full((n_stars, n_phot), np.nan)
            count = np.zeros((n_stars, n_phot), np.int32)
            for s in blocks:
                values = np.asarray(d["fitted"][:, s], float)
                for p in range(n_phot):
                    m = master_block(values[:, :, p], config, n_frames)
                    master[s, p], scatter[s, p], count[s, p] = m.magnitude, m.scatter, m.count
            # The fits cannot tell a master from the master plus any function of the
            # stars' own terms (magnitude, colour): every frame's correction absorbs it.
            # That part of the change is taken out, so the master keeps the reference
            # frame's zero point and scale and the iterations converge.
            # (Every fit over the stars takes them in the union's key order, ``column_of``,
            # whatever the columns' order: the night's figures do not depend on the order
            # in which the field's stars were registered, to the last bit.)
            c = column_of
            for p in range(n_phot):
                master[c, p] = _anchored(
                    master[c, p], reference[g][c, p], scatter[c, p], star_terms,
                    known[g][c, p] - np.nanmedian(known[g][:, p]),
                    None if colour is None else colour[c, p], config,
                )  # fmt: skip
            variable = np.zeros((n_stars, n_phot), bool)
            for p in range(n_phot):
                variable[c, p], _ = variable_stars(
                    master[c, p], scatter[c, p], threshold=config.variable_threshold
                )
            # The change over the stars that are fitted (a faint star's master matters
            # to nothing else, and its median moves with its noise).
            ordered_master, ordered_reference = master[c], reference[g][c]
            both = np.isfinite(ordered_master) & np.isfinite(ordered_reference)
            both &= scatter[c] <= config.max_error
            for p in range(n_phot):
                if both[:, p].any():
                    diff = ordered_master[both[:, p], p] - ordered_reference[both[:, p], p]
                    change = max(change, float(np.mean(diff**2)))
            d["master"][...] = master
            d["master_scatter"][...] = scatter
            d["master_count"][...] = count
            d["variable"][...] = variable
            variable_masks[g] = variable
            reference[g] = np.where(variable, np.nan, master)
        changes.append(change)
        # The first master has no predecessor (its change is against the single
        # reference frame, noise and all): a second one is always built.
        if iterations > 1 and change <= config.convergence:
            break
    group.attrs["channels"] = ",".join(groups)
    group.attrs["photometries"] = ",".join(photometries)
    group.attrs["terms"] = ",".join(expression.describe(t) for t in terms)
    group.attrs["extra_terms"] = len(extra.terms)
    group.attrs["iterations"] = iterations
    group.attrs["changes"] = json.dumps(changes)
    group.attrs["notes"] = json.dumps(notes)
    per_frame: dict[str, Any] = {}
    for g in groups:
        d = datasets[g]
        rms = np.asarray(d["fit_rms"])
        stars_used = np.asarray(d["fit_stars"])
        rejected = np.asarray(d["fit_rejected"])
        failed = np.asarray([[bool(v) for v in row] for row in d["fit_reason"][()]])
        fit_figures[g] = {
            name: {
                "median_rms_mmag": 1e3 * float(np.nanmedian(rms[:, p]))
                if np.isfinite(rms[:, p]).any()
                else None,
                "frames_failed": int(failed[:, p].sum()),
                "variables": int(variable_masks[g][:, p].sum()),
                "master_stars": int(np.isfinite(np.asarray(d["master"][:, p])).sum()),
            }
            for p, name in enumerate(photometries)
        }
        for i, frame in enumerate(frames):
            entry = per_frame.setdefault(frame.image.path.name, {})
            entry[g] = {
                "stars": int(stars_used[i, middle]),
                "rms_mmag": round(1e3 * float(rms[i, middle]), 2)
                if np.isfinite(rms[i, middle])
                else None,
                "rejected": round(float(rejected[i, middle]), 4)
                if np.isfinite(rejected[i, middle])
                else None,
            }
    figures = {
        "frames": n_frames,
        "stars": n_stars,
        "reference_frame": frames[r].image.path.name,
        "reference_reason": reason,
        "iterations": iterations,
        "changes": changes,
        "converged": bool(changes and changes[-1] <= config.convergence),
        "terms": len(terms),
        "notes": notes,
        "photometry_of_frame_figures": photometries[middle],
        "channels": fit_figures,
    }
    return figures, per_frame


def _anchored(
    master: np.ndarray,
    previous: np.ndarray,
    scatter: np.ndarray,
    star_terms: Expression,
    magnitude: np.ndarray,
    colour: np.ndarray | None,
    config: MagfitConfig,
) -> np.ndarray:
    """``master`` less the weighted fit of its change from ``previous`` by the terms of
    the stars' own variables (their magnitude and colour)."""
    if not star_terms.terms:
        return master
    variables = {"mag": magnitude}
    if colour is not None:
        variables["colour"] = colour
    design = star_terms.design(variables)
    change = master - previous
    use = np.isfinite(change) & (scatter <= config.max_error) & np.all(np.isfinite(design), axis=1)
    if use.sum() < 3 * design.shape[1]:
        return master
    root = 1.0 / (scatter[use] + config.error_floor)
    coefficients, *_ = np.linalg.lstsq(design[use] * root[:, None], change[use] * root, rcond=None)
    with np.errstate(invalid="ignore"):
        return master - design @ coefficients


def _colour(known: dict[str, np.ndarray]) -> np.ndarray:
    """The stars' instrumental R − B on the reference per photometry, a star without one
    given the median, centred on the median."""
    colour = known["R"] - known["B"]
    for p in range(colour.shape[1]):
        column = colour[:, p]
        finite = np.isfinite(column)
        centre = float(np.median(column[finite])) if finite.any() else 0.0
        if finite.sum() > 10:
            lo, hi = np.percentile(column[finite], [1, 99])
            column = np.clip(column, lo, hi)
        colour[:, p] = np.where(np.isfinite(column), column, centre) - centre
    return colour


def _fit_frames(
    d: h5py.Group,
    reference: np.ndarray,
    known: np.ndarray,
    colour: np.ndarray | None,
    expression: Expression,
    extra: Expression,
    levels: list[int],
    config: MagfitConfig,
    scale: tuple[float, float, float, float],
    n_frames: int,
    cell: int,
    order: np.ndarray,
) -> None:
    """Fit every frame of a channel against ``reference`` and write its fitted row.

    The stars are fitted in ``order`` (the columns of the union's sorted keys), so the
    fits do not depend on the columns' order."""
    cx, hx, cy, hy = scale
    n_phot = reference.shape[1]
    zero = np.nanmedian(known, axis=0)
    uses_airmass = "airmass" in expression.variables
    reference, known = reference[order], known[order]
    colour = None if colour is None else colour[order]
    for i in range(n_frames):
        magnitude = np.asarray(d["magnitude"][i], float)[order]
        error = np.asarray(d["magnitude_err"][i], float)[order]
        raw_x = np.asarray(d["x"][i], float)[order]
        raw_y = np.asarray(d["y"][i], float)[order]
        x = (raw_x - cx) / hx
        y = (raw_y - cy) / hy
        air = np.asarray(d["airmass"][i], float)[order] if uses_airmass else None
        fitted = np.full(magnitude.shape, np.nan, np.float32)
        stars, extended_terms = np.zeros(n_phot, np.int32), np.zeros(n_phot, np.int32)
        rms, rejected = np.full(n_phot, np.nan), np.full(n_phot, np.nan)
        coefficients = np.full(d["fit_coefficients"].shape[1:], np.nan)
        reasons = []
        finer = extra.design({"x": x, "y": y})  # the same for every photometry
        phases = {}
        if PHASES & set(expression.variables):
            # The star's place within the channel's cell (2 px for a Bayer channel).
            angle_x, angle_y = 2 * np.pi * raw_x / cell, 2 * np.pi * raw_y / cell
            phases = {"cx": np.cos(angle_x), "sx": np.sin(angle_x),
                      "cy": np.cos(angle_y), "sy": np.sin(angle_y)}  # fmt: skip
        for p in range(n_phot):
            variables = {"mag": known[:, p] - zero[p], "x": x, "y": y}
            if phases:
                variables.update(phases)
            if colour is not None:
                variables["colour"] = colour[:, p]
            if air is not None:
                variables["airmass"] = air
            design = expression.design(variables)
            fit, extended = fit_frame_adaptive(
                reference[:, p] - magnitude[:, p], error[:, p], design, finer, config,
                levels=levels, magnitude=variables["mag"], positions=(x, y),
            )  # fmt: skip
            stars[p], extended_terms[p] = int(fit.used.sum()), extended
            reasons.append(fit.reason)
            if fit.ok:
                # The magnitude variable clamped into the fitted range: a star fainter
                # (or brighter) than every fitted one is not corrected by extrapolation.
                clamped = dict(variables, mag=np.clip(variables["mag"], *fit.mag_range))
                full = np.column_stack([expression.design(clamped), finer])
                fitted[:, p] = apply_correction(magnitude[:, p], full, fit)
                rms[p], rejected[p] = fit.rms, fit.rejected_fraction
                coefficients[p] = fit.coefficients
        in_columns = np.empty_like(fitted)
        in_columns[order] = fitted
        d["fitted"][i] = in_columns
        d["fit_stars"][i], d["fit_extended"][i] = stars, extended_terms
        d["fit_rms"][i], d["fit_rejected"][i] = rms, rejected
        d["fit_coefficients"][i] = coefficients
        d["fit_reason"][i] = np.asarray(reasons, object)
