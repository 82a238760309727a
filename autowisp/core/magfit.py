"""Ensemble magnitude fitting: each frame's magnitudes tied to a common reference.

For one channel and one photometry (an aperture, or the PSF fluxes) of a night:

1. **Correction.** A frame's magnitude difference to the reference, ``ref − mag``, is
   fitted as a linear combination of the terms of an :class:`Expression` (monomials of
   the star's reference magnitude, its position, its colour, its airmass, ...) by
   weighted least squares, weights ``1/(σ + floor)²``, stars with ``σ > max_error`` left
   out, and points whose residual exceeds ``rejection`` times the weighted RMS rejected
   iteratively (:func:`fit_frame`). The fitted correction is added to every star of the
   frame, the magnitude variable clamped into the range the fit saw, so a faint star
   beyond the fitted stars is not corrected by an extrapolated cubic.
2. **Master reference.** Per star, the median of the corrected magnitudes over the frames
   with iterative rejection about the median in units of the median absolute deviation
   (:func:`master_block`); stars seen in fewer than ``min_frames_fraction`` of the frames
   left out; variables, whose scatter exceeds the scatter–magnitude relation by more than
   ``variable_threshold`` times the median excess, left out of the next fits
   (:func:`variable_stars`).
3. The fits are repeated against the master until it changes by less than
   ``convergence`` mag² (mean square) or ``max_iterations`` masters were built.

Facts from the original (AutoWISP ``fit_magnitudes``): the 20 monomials of order ≤ 3 in
G, x, y; weights ``1/(σ + 0.01)²``; σ > 0.1 left out; 5σ rejection up to 20 times; master
as a rejected median; a source needs more than half the observations; one-sided 3×
scatter cut for variables; up to 5 iterations stopping at 1e-4 mag². Here the magnitude
variable is the star's magnitude on the reference in the fitted channel (every star has
one, the deep list's too; the catalogue's G does not exist beyond G = 10) and the colour
the reference's instrumental colour (ditto).

Everything here works on arrays; the step (:mod:`autowisp.steps.magfit`) streams the
night through it frame by frame and in blocks of stars.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.stats

from autowisp.core.timing import hour_angle_airmass

__all__ = [
    "Expression",
    "FrameFit",
    "MagfitConfig",
    "MasterBlock",
    "apply_correction",
    "fit_frame",
    "fit_frame_adaptive",
    "master_block",
    "parse_expression",
    "reference_merit",
    "residual_pattern",
    "solve_least_squares",
    "variable_stars",
]


@dataclass(frozen=True)
class Expression:
    """A set of monomials over named variables: each term a tuple of (name, power)
    pairs, sorted, the constant term ``()``."""

    text: str
    terms: tuple[tuple[tuple[str, int], ...], ...]

    @property
    def variables(self) -> tuple[str, ...]:
        """The variables the terms use, sorted."""
        return tuple(sorted({name for term in self.terms for name, _ in term}))

    def without(self, names: Sequence[str]) -> Expression:
        """The expression with every term that uses one of ``names`` left out."""
        drop = set(names)
        kept = tuple(t for t in self.terms if not drop.intersection(n for n, _ in t))
        return Expression(f"{self.text} without {', '.join(sorted(drop))}", kept)

    def describe(self, term: tuple[tuple[str, int], ...]) -> str:
        """A term as text: ``1``, ``x``, ``mag^2*y``."""
        if not term:
            return "1"
        return "*".join(name if power == 1 else f"{name}^{power}" for name, power in term)

    def design(self, variables: Mapping[str, np.ndarray]) -> np.ndarray:
        """The design matrix (points × terms) of the terms over ``variables``."""
        size = len(next(iter(variables.values()))) if variables else 0
        matrix = np.empty((size, len(self.terms)))
        powers: dict[tuple[str, int], np.ndarray] = {}

        def power(name: str, k: int) -> np.ndarray:
            if (name, k) not in powers:
                base = np.asarray(variables[name], float)
                powers[(name, k)] = base if k == 1 else power(name, k - 1) * base
            return powers[(name, k)]

        for column, term in enumerate(self.terms):
            if not term:
                matrix[:, column] = 1.0
                continue
            values = power(*term[0])
            for name, k in term[1:]:
                values = values * power(name, k)
            matrix[:, column] = values
        return matrix


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTOR = re.compile(rf"\s*(?:O(\d+)\{{([^{{}}]*)\}}|({_NAME}|1))\s*")


def _merge(*terms: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    powers: dict[str, int] = {}
    for term in terms:
        for name, power in term:
            powers[name] = powers.get(name, 0) + power
    return tuple(sorted((n, p) for n, p in powers.items() if p))


def _factor(text: str, expression: str) -> list[tuple[tuple[str, int], ...]]:
    match = _FACTOR.fullmatch(text)
    if match is None:
        raise ValueError(
            f"magnitude-fit expression {expression!r}: cannot read {text.strip()!r} (a factor "
            "is a variable name, 1, or O<order>{name, name, ...})"
        )
    order, names, single = match.groups()
    if single is not None:
        return [()] if single == "1" else [((single, 1),)]
    listed = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in listed if re.fullmatch(_NAME, n) is None]
    if bad or not listed:
        raise ValueError(
            f"magnitude-fit expression {expression!r}: O{order}{{{names}}} needs a "
            "comma-separated list of variable names"
        )
    terms = []
    for total in range(int(order) + 1):
        for combination in itertools.combinations_with_replacement(sorted(set(listed)), total):
            terms.append(_merge(*(((n, 1),) for n in combination)))
    return terms


def parse_expression(text: str) -> Expression:
    """Read an expression: terms joined by ``+``, each a product (``*``) of factors; a
    factor is a variable, ``1``, or ``O<n>{a, b, ...}``, every monomial of total order
    ≤ n in the listed variables (the constant included). ``O3{mag, x, y}`` is the
    original's 20 terms; ``O3{mag, x, y} + colour + colour*airmass`` adds a colour term
    and its change with airmass. Duplicated terms count once.

    Raises
    ------
    ValueError
        For text that is not such an expression (nothing is evaluated).
    """
    if not text.strip():
        raise ValueError("the magnitude-fit expression is empty")
    terms: list[tuple[tuple[str, int], ...]] = []
    for product in text.split("+"):
        factors = [_factor(part, text) for part in product.split("*")]
        for combination in itertools.product(*factors):
            term = _merge(*combination)
            if term not in terms:
                terms.append(term)
    return Expression(text.strip(), tuple(terms))


@dataclass(frozen=True)
class MagfitConfig:
    """Settings of the fits and the master (defaults: the original's)."""

    error_floor: float = 0.01  # mag, added to σ in the weights
    max_error: float = 0.1  # mag: stars with a larger σ are not fitted
    rejection: float = 5.0  # residuals beyond this many weighted RMS are rejected
    max_rejection_iterations: int = 20
    min_stars_per_term: float = 3.0  # fewer fitting stars per term: the frame fails
    master_rejection: float = 5.0  # in median absolute deviations
    master_iterations: int = 10
    min_frames_fraction: float = 0.5  # a master star needs this fraction of the frames
    variable_threshold: float = 3.0  # excess scatter in median excesses
    max_iterations: int = 5
    convergence: float = 1e-4  # mag², mean square change of the master


@dataclass(frozen=True)
class FrameFit:
    """One frame's fitted correction."""

    coefficients: np.ndarray  # per term (NaN: the fit failed)
    used: np.ndarray  # bool per point: in the final fit
    candidates: int  # points that could be fitted (finite, σ ≤ max_error, not variable)
    rms: float  # mag, unweighted RMS of the used points' residuals
    mag_range: tuple[float, float]  # the fitted stars' range of the magnitude variable
    reason: str = ""  # why the fit failed ("" when it did not)

    @property
    def ok(self) -> bool:
        return not self.reason

    @property
    def rejected_fraction(self) -> float:
        if self.candidates == 0:
            return float("nan")
        return 1.0 - float(self.used.sum()) / self.candidates


def solve_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares solution of ``design @ β ≈ target`` by
    :class:`_NormalEquations` with unit weights: the normal equations of the
    column-equilibrated design by Cholesky, with one step of iterative refinement
    (3–20× faster than an SVD for the sizes of a frame's fit; predictions agree with
    ``numpy.linalg.lstsq`` to 1e-13 mag for 103 terms of condition 4e5), the SVD where
    they are singular."""
    rows = np.ones(len(target), bool)
    return _NormalEquations(design, target, np.ones(len(target)), rows).solve(rows)


class _NormalEquations:
    """The weighted normal equations of a frame's fit, kept as points are rejected or
    taken back: built once over the candidates, then down- and updated by the rows that
    change (a rejection pass costs those rows, not the frame), solved by Cholesky on the
    column-equilibrated system with one step of refinement; the SVD where singular."""

    def __init__(self, design: np.ndarray, target: np.ndarray, weight: np.ndarray,
                 rows: np.ndarray) -> None:  # fmt: skip
        self.design, self.target, self.weight = design, target, weight
        root = np.sqrt(weight[rows])
        self.norms = np.sqrt(np.einsum("ij,ij->j", design[rows] * root[:, None],
                                       design[rows] * root[:, None]))  # fmt: skip
        self.ok = bool(np.all(self.norms > 0))
        if self.ok:
            scaled = design[rows] / self.norms
            self.a = (scaled * weight[rows, None]).T @ scaled
            self.b = scaled.T @ (weight[rows] * target[rows])

    def update(self, before: np.ndarray, after: np.ndarray) -> None:
        """From the rows ``before`` to the rows ``after``."""
        if not self.ok:
            return
        for rows, sign in ((before & ~after, -1.0), (after & ~before, 1.0)):
            if rows.any():
                scaled = self.design[rows] / self.norms
                w = self.weight[rows]
                self.a += sign * ((scaled * w[:, None]).T @ scaled)
                self.b += sign * (scaled.T @ (w * self.target[rows]))

    def solve(self, rows: np.ndarray) -> np.ndarray:
        root = np.sqrt(self.weight[rows])
        if self.ok:
            try:
                factor = scipy.linalg.cho_factor(self.a, check_finite=False)
            except np.linalg.LinAlgError:
                pass
            else:
                beta = scipy.linalg.cho_solve(factor, self.b, check_finite=False)
                scaled = self.design[rows] / self.norms
                residual = self.weight[rows] * (self.target[rows] - scaled @ beta)
                beta = beta + scipy.linalg.cho_solve(factor, scaled.T @ residual,
                                                     check_finite=False)  # fmt: skip
                if np.all(np.isfinite(beta)):
                    return beta / self.norms
        beta, *_ = np.linalg.lstsq(
            self.design[rows] * root[:, None], self.target[rows] * root, rcond=None
        )
        return np.asarray(beta)


def fit_frame(
    target: np.ndarray,
    error: np.ndarray,
    design: np.ndarray,
    config: MagfitConfig,
    *,
    allowed: np.ndarray | None = None,
    magnitude: np.ndarray | None = None,
) -> FrameFit:
    """Fit ``target`` (``ref − mag`` per star) by the columns of ``design``.

    ``error`` is each point's σ (mag); ``allowed`` leaves stars out (variables, stars
    the master lacks); ``magnitude`` is recorded as the range the fit saw.
    """
    target = np.asarray(target, float)
    error = np.asarray(error, float)
    n_terms = design.shape[1]
    candidate = np.isfinite(target) & np.isfinite(error) & (error <= config.max_error)
    candidate &= np.all(np.isfinite(design), axis=1)
    if allowed is not None:
        candidate &= allowed
    count = int(candidate.sum())
    nan = np.full(n_terms, np.nan)
    if count < max(n_terms * config.min_stars_per_term, n_terms + 1):
        return FrameFit(
            nan, np.zeros(target.size, bool), count, float("nan"), (np.nan, np.nan),
            f"{count} stars to fit {n_terms} terms (at least "
            f"{int(np.ceil(max(n_terms * config.min_stars_per_term, n_terms + 1)))} needed)",
        )  # fmt: skip
    weight = 1.0 / (error + config.error_floor) ** 2
    used = candidate.copy()
    coefficients = nan
    normal = _NormalEquations(design, target, weight, used)
    for _ in range(config.max_rejection_iterations + 1):
        coefficients = normal.solve(used)
        residual = target - design @ coefficients
        scale = np.sqrt(np.sum(weight[used] * residual[used] ** 2) / np.sum(weight[used]))
        # A point's allowed residual grows with its own error: the weighted RMS is that
        # of a point of the mean weight.
        limit = config.rejection * scale * np.sqrt(np.mean(weight[used]) / weight)
        keep = candidate & (np.abs(residual) <= limit)
        if np.array_equal(keep, used):
            break
        if keep.sum() < n_terms + 1:
            break
        normal.update(used, keep)
        used = keep
    residual = target - design @ coefficients
    rms = float(np.sqrt(np.mean(residual[used] ** 2)))
    span = (np.nan, np.nan)
    if magnitude is not None:
        m = np.asarray(magnitude, float)[used]
        span = (float(m.min()), float(m.max()))
    return FrameFit(np.asarray(coefficients, float), used, count, rms, span)


def fit_frame_adaptive(
    target: np.ndarray,
    error: np.ndarray,
    design: np.ndarray,
    extra: np.ndarray,
    config: MagfitConfig,
    *,
    levels: Sequence[int] = (),
    allowed: np.ndarray | None = None,
    magnitude: np.ndarray | None = None,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[FrameFit, int]:
    """:func:`fit_frame` with ``design``, then with more and more of the ``extra``
    columns (finer spatial terms, for a frame with a pattern the smooth terms cannot
    follow: partial clouds): the first ``levels[0]`` of them, then ``levels[1]``, ...
    A level is kept when it lowers the Bayesian information criterion ``χ² + k ln N``
    (χ² in units of the weighted residual variance of the fit it is compared with, over
    the points either fit kept), and the ladder stops at the first level that does not.

    With ``positions`` (the stars' x, y scaled to [−1, 1]) the ladder is tried only
    when the first fit's residuals show a pattern (:func:`residual_pattern`): a clear
    frame then costs one fit, not two.

    Returns the fit (coefficients over ``design`` then all of ``extra``, those not used
    0) and how many extra columns it used."""
    n_extra = extra.shape[1]
    base = fit_frame(target, error, design, config, allowed=allowed, magnitude=magnitude)
    best, best_design, used_extra = base, design, 0
    weight = 1.0 / (np.asarray(error, float) + config.error_floor) ** 2
    if base.ok and positions is not None and levels:
        residual = target - design @ base.coefficients
        if not residual_pattern(residual, weight, base.used, *positions):
            levels = ()
    for level in levels if base.ok else ():
        level = min(int(level), n_extra)
        if level <= used_extra:
            continue
        full = np.column_stack([design, extra[:, :level]])
        wide = fit_frame(target, error, full, config, allowed=allowed, magnitude=magnitude)
        if not wide.ok:
            break
        # On the points either fit kept: a pattern the smooth terms cannot follow makes
        # them reject the stars it dims, which the finer terms then keep.
        either = best.used | wide.used
        n = int(either.sum())
        if n <= full.shape[1] + 1:
            break
        variance = np.sum(
            weight[best.used] * (target - best_design @ best.coefficients)[best.used] ** 2
        )
        variance /= max(int(best.used.sum()), 1)
        if not variance > 0:
            break
        w = weight[either]
        chi_best = float(
            np.sum(w * (target - best_design @ best.coefficients)[either] ** 2) / variance
        )
        chi_wide = float(np.sum(w * (target - full @ wide.coefficients)[either] ** 2) / variance)
        if chi_wide + full.shape[1] * np.log(n) >= chi_best + best_design.shape[1] * np.log(n):
            break
        best, best_design, used_extra = wide, full, level
    padded = np.zeros(design.shape[1] + n_extra)
    padded[: best.coefficients.size] = best.coefficients
    if not best.ok:
        padded[:] = np.nan
    return (
        FrameFit(padded, best.used, best.candidates, best.rms, best.mag_range, best.reason),
        used_extra,
    )


def residual_pattern(
    residual: np.ndarray,
    weight: np.ndarray,
    used: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    cells: int = 6,
    threshold: float = 3.0,
) -> bool:
    """Whether a fit's residuals hold a pattern over the frame: the weighted mean
    residual in each of ``cells`` × ``cells`` cells of x, y in [−1, 1] (cells of 5
    points or more) against its error from the residuals' own scatter; a pattern when
    their χ² exceeds its count by ``threshold`` standard deviations (√(2 dof))."""
    r, w = residual[used], weight[used]
    if r.size < 10:
        return False
    scale2 = float(np.sum(w * r**2) / r.size)
    if not scale2 > 0:
        return False
    ix = np.clip(((x[used] + 1) / 2 * cells).astype(int), 0, cells - 1)
    iy = np.clip(((y[used] + 1) / 2 * cells).astype(int), 0, cells - 1)
    cell = iy * cells + ix
    total_w = np.bincount(cell, w, cells * cells)
    total_wr = np.bincount(cell, w * r, cells * cells)
    count = np.bincount(cell, minlength=cells * cells)
    full = count >= 5
    if full.sum() < 4:
        return False
    chi2 = float(np.sum(total_wr[full] ** 2 / total_w[full]) / scale2)
    dof = int(full.sum())
    return chi2 > dof + threshold * np.sqrt(2 * dof)


def apply_correction(magnitude: np.ndarray, design: np.ndarray, fit: FrameFit) -> np.ndarray:
    """The corrected magnitudes ``mag + design @ coefficients`` (NaN where the fit failed
    or the point's terms are not finite)."""
    if not fit.ok:
        return np.full(np.shape(magnitude), np.nan)
    return np.asarray(magnitude, float) + design @ fit.coefficients


@dataclass(frozen=True)
class MasterBlock:
    """The master reference of a block of stars."""

    magnitude: np.ndarray  # rejected median (NaN: too few frames)
    scatter: np.ndarray  # RMS about it of the kept points, mag
    count: np.ndarray  # frames kept


def master_block(corrected: np.ndarray, config: MagfitConfig, frames: int) -> MasterBlock:
    """The master of a block of stars from their corrected magnitudes (frames × stars,
    NaN where not measured): per star the median with iterative rejection beyond
    ``master_rejection`` median absolute deviations about it; stars kept in fewer than
    ``min_frames_fraction`` of ``frames`` get NaN."""
    values = np.array(corrected, float, copy=True)
    keep = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        for _ in range(config.master_iterations):
            masked = np.where(keep, values, np.nan)
            centre = _nanmedian(masked)
            deviation = np.abs(masked - centre)
            spread = _nanmedian(deviation)
            new = keep & (deviation <= config.master_rejection * np.maximum(spread, 1e-6))
            if np.array_equal(new, keep):
                break
            keep = new
        masked = np.where(keep, values, np.nan)
        centre = _nanmedian(masked)
        count = keep.sum(axis=0)
        scatter = np.sqrt(np.nansum((masked - centre) ** 2, axis=0) / np.maximum(count - 1, 1))
    enough = count >= config.min_frames_fraction * frames
    scatter = np.where(count > 1, scatter, np.nan)
    return MasterBlock(np.where(enough, centre, np.nan), np.where(enough, scatter, np.nan), count)


def _nanmedian(values: np.ndarray) -> np.ndarray:
    """The median over axis 0, NaN (without a warning) for all-NaN columns."""
    if values.shape[0] == 0:
        return np.full(values.shape[1:], np.nan)
    empty = np.all(np.isnan(values), axis=0)
    filled = np.where(empty[None, :], 0.0, values)
    return np.where(empty, np.nan, np.nanmedian(filled, axis=0))


def variable_stars(
    magnitude: np.ndarray,
    scatter: np.ndarray,
    *,
    threshold: float = 3.0,
    order: int = 2,
    rejection: float = 3.0,
    iterations: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Stars whose scatter exceeds the scatter–magnitude relation: log10(scatter) fitted
    as a polynomial of ``order`` in the magnitude with rejection beyond ``rejection``
    median absolute residuals; a star is variable when its excess over the relation is
    above ``threshold`` times the median absolute excess (one-sided: a quiet star is
    never excluded). Returns the variable mask and the excess (log10) per star."""
    magnitude = np.asarray(magnitude, float)
    log_scatter = np.log10(np.where(scatter > 0, scatter, np.nan))
    good = np.isfinite(magnitude) & np.isfinite(log_scatter)
    excess = np.full(magnitude.size, np.nan)
    if good.sum() < order + 3:
        return np.zeros(magnitude.size, bool), excess
    centre = float(np.median(magnitude[good]))
    span = float(np.ptp(magnitude[good])) or 1.0
    u = (magnitude - centre) / span
    design = np.column_stack([u**p for p in range(order + 1)])
    used = good.copy()
    coefficients = np.zeros(order + 1)
    for _ in range(iterations):
        coefficients, *_ = np.linalg.lstsq(design[used], log_scatter[used], rcond=None)
        residual = log_scatter - design @ coefficients
        spread = float(np.median(np.abs(residual[used])))
        new = good & (np.abs(residual) <= rejection * max(spread, 1e-6))
        if np.array_equal(new, used) or new.sum() < order + 3:
            break
        used = new
    excess = np.where(good, log_scatter - design @ coefficients, np.nan)
    typical = float(np.median(np.abs(excess[used])))
    with np.errstate(invalid="ignore"):
        variable = good & (excess > threshold * max(typical, 1e-6))
    return variable, excess


def reference_merit(
    criteria: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """How good each frame is as the reference: for each criterion (frames, smaller is
    better; NaN the worst), its rank quantile q in [0, 1]; the merit is
    ``1 / (Σ q² + 0.01)`` (the original's ``1/((1−q_sharp)² + q_bg²)`` extended to every
    criterion). Returns the merits and the quantiles."""
    quantiles: dict[str, np.ndarray] = {}
    size = len(next(iter(criteria.values())))
    total = np.zeros(size)
    for name, values in criteria.items():
        v = np.asarray(values, float)
        v = np.where(np.isfinite(v), v, np.inf)
        # Average ranks: frames that tie share a quantile (a criterion equal on every
        # frame favours none).
        q = (scipy.stats.rankdata(v, method="average") - 1) / max(size - 1, 1)
        quantiles[name] = q
        total += q**2
    return 1.0 / (total + 0.01), quantiles


def star_airmass(
    ra: np.ndarray, dec: np.ndarray, jd_utc: float, latitude: float, longitude: float
) -> np.ndarray:
    """Each star's airmass (Kasten & Young 1989) at ``jd_utc`` from a site at
    ``latitude``, ``longitude`` (deg, east positive): the ICRS position taken to the
    true equator and equinox of date (IAU 2006/2000A, erfa) and the apparent sidereal
    time, with UT1 and TT taken as UTC (a minute of time moves the precession by 0.01″),
    aberration and refraction left out (:func:`autowisp.core.timing.hour_angle_airmass`).
    NaN below the horizon."""
    shape = np.shape(ra)
    _, mass = hour_angle_airmass(np.array([jd_utc]), ra, dec, latitude, longitude)
    return mass[0].reshape(shape)
