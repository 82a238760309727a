"""Analytic elliptical PSFs with (S, D, K) shape parameters, their PRF integrals and fits.

The PSF at offset ``(dx, dy)`` (px) from a star's centre depends on the quadratic form

    Q(dx, dy) = S (dx² + dy²) + D (dx² − dy²) + 2 K dx dy,

positive definite (S > sqrt(D² + K²)), through one of two radial profiles, each
normalised to unit integral over the plane:

* ``gaussian``: f = sqrt(S² − D² − K²) / (2π) · exp(−Q / 2) (the fistar/HATNet shape);
* ``moffat``: f = (β − 1) sqrt(S² − D² − K²) / π · (1 + Q)^(−β), which adds the wings
  of seeing-limited and lens PSFs (Moffat 1969) with one more parameter β.

A channel pixel's expected electrons from a star of flux A is
``A · Σ_k w_k ∫∫_{cell k} f`` over the cells of the channel's sensitivity map
(:mod:`autowisp.core.subpixel`): the pixel response function (PRF) is the PSF convolved
with the sub-pixel sensitivity. The integrals use Gauss–Legendre quadrature of
:data:`QUADRATURE_ORDER` nodes per axis on each cell (a smooth integrand: the error is
far below the photon noise for FWHM ≥ 1 px, see the tests).

:func:`fit_source_shapes` fits (A, x, y, S, D, K) to each chosen star and
:func:`fit_shape_map` the smooth map of (S, D, K) over the frame, a polynomial in x, y
and magnitude with iterative rejection; :class:`ShapeMap` evaluates it for any star.
The numba functions :func:`profile` and :func:`rect_integral` are what the aperture and
PSF-flux kernels (:mod:`autowisp.core.aperture`) call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "GAUSSIAN",
    "MOFFAT",
    "QUADRATURE_ORDER",
    "ShapeMap",
    "SourceShapes",
    "fit_shape_map",
    "fit_source_shapes",
    "fwhm_of",
    "pixel_integrals",
    "profile",
    "rect_integral",
    "shape_from_fwhm",
]

#: Profile codes used by the numba kernels.
GAUSSIAN = 0
MOFFAT = 1
PROFILES = {"gaussian": GAUSSIAN, "moffat": MOFFAT}

#: Gauss–Legendre nodes per axis and cell.
QUADRATURE_ORDER = 5
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(QUADRATURE_ORDER)


def shape_from_fwhm(
    major: np.ndarray, minor: np.ndarray, theta: np.ndarray, *, kind: str = "gaussian",
    beta: float = 3.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(S, D, K) of a PSF with the given FWHMs (px) along its axes, major axis at ``theta``
    (rad, counter-clockwise from +x)."""
    major, minor, theta = (np.asarray(v, dtype=float) for v in (major, minor, theta))
    level = 8.0 * np.log(2.0) if kind == "gaussian" else 4.0 * (2.0 ** (1.0 / beta) - 1.0)
    low, high = level / major**2, level / minor**2  # eigenvalues of the quadratic form
    s = (low + high) / 2
    half = (high - low) / 2
    # Q's matrix is R diag(low, high) Rᵀ; D and K are its anisotropic part.
    d = -half * np.cos(2 * theta)
    k = -half * np.sin(2 * theta)
    return s, d, k


def fwhm_of(
    s: np.ndarray, d: np.ndarray, k: np.ndarray, *, kind: str = "gaussian", beta: float = 3.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FWHM (px) along the major and minor axes and the major axis angle (rad, [0, π))."""
    s, d, k = (np.asarray(v, dtype=float) for v in (s, d, k))
    level = 8.0 * np.log(2.0) if kind == "gaussian" else 4.0 * (2.0 ** (1.0 / beta) - 1.0)
    spread = np.hypot(d, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        major = np.sqrt(level / (s - spread))
        minor = np.sqrt(level / (s + spread))
    theta = np.mod(0.5 * np.arctan2(-k, -d), np.pi)
    return major, minor, theta


@numba.njit(cache=True, nogil=True)
def profile(kind, beta, s, d, k, dx, dy):
    """PSF value (px⁻²) at offset (dx, dy); 0 for a shape that is not positive definite."""
    det = s * s - d * d - k * k
    if det <= 0.0 or s <= 0.0:
        return 0.0
    q = s * (dx * dx + dy * dy) + d * (dx * dx - dy * dy) + 2.0 * k * dx * dy
    if kind == GAUSSIAN:
        return np.sqrt(det) / (2.0 * np.pi) * np.exp(-0.5 * q)
    return (beta - 1.0) * np.sqrt(det) / np.pi * (1.0 + q) ** (-beta)


@numba.njit(cache=True, nogil=True)
def rect_integral(kind, beta, s, d, k, x0, x1, y0, y1, nodes, weights):
    """∫∫ PSF over the rectangle [x0, x1] × [y0, y1] (offsets from the centre, px)."""
    hx = 0.5 * (x1 - x0)
    hy = 0.5 * (y1 - y0)
    cx = 0.5 * (x1 + x0)
    cy = 0.5 * (y1 + y0)
    total = 0.0
    for j in range(nodes.shape[0]):
        yy = cy + hy * nodes[j]
        row = 0.0
        for i in range(nodes.shape[0]):
            row += weights[i] * profile(kind, beta, s, d, k, cx + hx * nodes[i], yy)
        total += weights[j] * row
    return total * hx * hy


def pixel_integrals(
    kind: int, beta: float, shape: np.ndarray, dx: np.ndarray, dy: np.ndarray, cells: np.ndarray
) -> np.ndarray:
    """PRF of channel pixels: Σ_k w_k ∫∫_{cell k} PSF, vectorised over pixels.

    ``shape`` is (S, D, K) for all pixels (3,) or per pixel (n, 3); ``dx``, ``dy`` (n,)
    are the pixel centres' offsets from the star (px); ``cells`` the sensitivity cells
    ``(dx0, dx1, dy0, dy1, w)`` relative to the pixel centre.
    """
    shape = np.asarray(shape, dtype=float)
    s, d, k = (shape[..., i][..., None, None, None] for i in range(3))
    dx = np.asarray(dx, float)[:, None, None, None]
    dy = np.asarray(dy, float)[:, None, None, None]
    x0, x1, y0, y1, w = (cells[:, i][None, :, None, None] for i in range(5))
    hx, hy = (x1 - x0) / 2, (y1 - y0) / 2
    px = dx + (x0 + x1) / 2 + hx * _NODES[None, None, None, :]
    py = dy + (y0 + y1) / 2 + hy * _NODES[None, None, :, None]
    det = np.maximum(s * s - d * d - k * k, 0.0)
    # q ≥ 0 for a positive-definite shape; the clip keeps a trial shape that is not
    # (during a fit) finite, and its value is 0 through det anyway
    q = np.maximum(s * (px * px + py * py) + d * (px * px - py * py) + 2 * k * px * py, 0.0)
    if kind == GAUSSIAN:
        value = np.sqrt(det) / (2 * np.pi) * np.exp(-0.5 * q)
    else:
        value = (beta - 1) * np.sqrt(det) / np.pi * (1 + q) ** (-beta)
    weighted = value * _WEIGHTS[None, None, :, None] * _WEIGHTS[None, None, None, :]
    return (weighted.sum(axis=(2, 3)) * hx[..., 0, 0] * hy[..., 0, 0] * w[..., 0, 0]).sum(axis=1)


def model_and_jacobian(
    kind: int, params: np.ndarray, px: np.ndarray, py: np.ndarray, cells: np.ndarray,
    beta: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A star's PRF model of its pixels and the model's derivatives.

    ``params`` are (A, xc, yc, S, D, K) and, when ``beta`` is None (a Moffat with a free
    index), β last; ``px``, ``py`` the pixel centres (px). Returns the model (n,) and the
    Jacobian (n, len(params)), both integrated over the sensitivity cells like
    :func:`pixel_integrals` (analytic derivatives under the quadrature).
    """
    amplitude, xc, yc, s, d, k = (float(v) for v in params[:6])
    index = float(params[6]) if beta is None else float(beta)
    x0, x1, y0, y1, w = (cells[:, i][None, :, None, None] for i in range(5))
    hx, hy = (x1 - x0) / 2, (y1 - y0) / 2
    dx = (np.asarray(px, float) - xc)[:, None, None, None] + (x0 + x1) / 2 + hx * _NODES
    dy = (np.asarray(py, float) - yc)[:, None, None, None] + (y0 + y1) / 2 + hy * _NODES[:, None]
    det = s * s - d * d - k * k
    if det <= 0 or s <= 0:
        n = len(px)
        return np.zeros(n), np.zeros((n, len(params)))
    q = np.maximum(s * (dx * dx + dy * dy) + d * (dx * dx - dy * dy) + 2 * k * dx * dy, 0.0)
    dq = {
        "x": -(2 * (s + d) * dx + 2 * k * dy),
        "y": -(2 * (s - d) * dy + 2 * k * dx),
        "s": dx * dx + dy * dy,
        "d": dx * dx - dy * dy,
        "k": 2 * dx * dy,
    }
    dlog_norm = {"x": 0.0, "y": 0.0, "s": s / det, "d": -d / det, "k": -k / det}
    if kind == GAUSSIAN:
        value = np.sqrt(det) / (2 * np.pi) * np.exp(-0.5 * q)
        slope = -0.5 * np.ones_like(q)
    else:
        value = (index - 1) * np.sqrt(det) / np.pi * (1 + q) ** (-index)
        slope = -index / (1 + q)
    area = hx * hy * w * (_WEIGHTS[:, None] * _WEIGHTS[None, :])

    def integrate(field: np.ndarray) -> np.ndarray:
        return (field * area).sum(axis=(1, 2, 3))

    prf = integrate(value)
    columns = [prf]
    for name in ("x", "y", "s", "d", "k"):
        columns.append(amplitude * integrate(value * (dlog_norm[name] + slope * dq[name])))
    if beta is None and kind != GAUSSIAN:
        columns.append(amplitude * integrate(value * (1 / (index - 1) - np.log1p(q))))
    return amplitude * prf, np.column_stack(columns)


# -- the per-source least-squares kernel ------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _model_jacobian(kind, fixed_beta, params, px, py, cells, nodes, weights, model, jac):
    """Numba twin of :func:`model_and_jacobian` into ``model`` (n,) and ``jac`` (n, p).

    β is ``params[6]`` when ``jac`` has 7 columns, else ``fixed_beta``. Returns False
    (and leaves the arrays undefined) for a shape that is not positive definite.
    """
    amplitude, xc, yc, s, d, k = params[0], params[1], params[2], params[3], params[4], params[5]
    free = jac.shape[1] == 7
    index = params[6] if free else fixed_beta
    det = s * s - d * d - k * k
    if det <= 0.0 or s <= 0.0:
        return False
    root = np.sqrt(det)
    if kind == GAUSSIAN:
        norm = root / (2.0 * np.pi)
    else:
        norm = (index - 1.0) * root / np.pi
    ls, ld, lk = s / det, -d / det, -k / det
    m = nodes.shape[0]
    for p in range(px.shape[0]):
        f_sum = 0.0
        gx = gy = gs = gd = gk = gb = 0.0
        for c in range(cells.shape[0]):
            hx = 0.5 * (cells[c, 1] - cells[c, 0])
            hy = 0.5 * (cells[c, 3] - cells[c, 2])
            cx = px[p] - xc + 0.5 * (cells[c, 0] + cells[c, 1])
            cy = py[p] - yc + 0.5 * (cells[c, 2] + cells[c, 3])
            scale = hx * hy * cells[c, 4]
            for j in range(m):
                dy = cy + hy * nodes[j]
                for i in range(m):
                    dx = cx + hx * nodes[i]
                    q = s * (dx * dx + dy * dy) + d * (dx * dx - dy * dy) + 2.0 * k * dx * dy
                    if q < 0.0:
                        q = 0.0
                    if kind == GAUSSIAN:
                        value = norm * np.exp(-0.5 * q)
                        slope = -0.5
                    else:
                        value = norm * (1.0 + q) ** (-index)
                        slope = -index / (1.0 + q)
                    v = value * weights[i] * weights[j] * scale
                    f_sum += v
                    vs = v * slope
                    gx += vs * -(2.0 * (s + d) * dx + 2.0 * k * dy)
                    gy += vs * -(2.0 * (s - d) * dy + 2.0 * k * dx)
                    gs += v * ls + vs * (dx * dx + dy * dy)
                    gd += v * ld + vs * (dx * dx - dy * dy)
                    gk += v * lk + vs * (2.0 * dx * dy)
                    if free:
                        gb += v * (1.0 / (index - 1.0) - np.log1p(q))
        model[p] = amplitude * f_sum
        jac[p, 0] = f_sum
        jac[p, 1] = amplitude * gx
        jac[p, 2] = amplitude * gy
        jac[p, 3] = amplitude * gs
        jac[p, 4] = amplitude * gd
        jac[p, 5] = amplitude * gk
        if free:
            jac[p, 6] = amplitude * gb
    return True


@numba.njit(cache=True, nogil=True)
def _robust_cost(model, values, sigma, f_scale):
    """½ Σ f² ρ((r/f)²) with the soft-L1 ρ(z) = 2(√(1+z) − 1), r = (model − value)/σ."""
    total = 0.0
    for p in range(model.shape[0]):
        z = ((model[p] - values[p]) / sigma[p] / f_scale) ** 2
        total += 2.0 * (np.sqrt(1.0 + z) - 1.0)
    return 0.5 * f_scale * f_scale * total


@numba.njit(cache=True, nogil=True)
def fit_prf_lm(kind, fixed_beta, p0, lower, upper, px, py, values, sigma, cells, nodes,
               weights, f_scale, max_iterations):  # fmt: skip
    """Levenberg–Marquardt fit of a star's PRF to its pixels under the soft-L1 loss.

    Minimises :func:`_robust_cost` over (A, x, y, S, D, K[, β]) within the bounds
    ``lower``/``upper`` (a step is cut back to them); the robust loss enters as
    iteratively reweighted least squares (weight ρ′ = (1 + (r/f)²)^−½, Gauss–Newton
    curvature) with Marquardt's diagonal damping. The same minimum as
    ``scipy.optimize.least_squares(..., loss='soft_l1')``, found without Python in the
    loop. Returns the parameters, the raw residuals (model − value)/σ and whether the
    fit converged (relative cost change or step below 1e-10 within ``max_iterations``).
    """
    n_par = p0.shape[0]
    n = px.shape[0]
    params = p0.copy()
    model = np.empty(n)
    jac = np.empty((n, n_par))
    trial_model = np.empty(n)
    trial_jac = np.empty((n, n_par))
    residual = np.empty(n)
    if not _model_jacobian(kind, fixed_beta, params, px, py, cells, nodes, weights, model, jac):
        return params, residual, False
    cost = _robust_cost(model, values, sigma, f_scale)
    damping = 1e-3
    converged = False
    normal = np.empty((n_par, n_par))
    gradient = np.empty(n_par)
    for _ in range(max_iterations):
        normal[:] = 0.0
        gradient[:] = 0.0
        for p in range(n):
            r = (model[p] - values[p]) / sigma[p]
            w = 1.0 / np.sqrt(1.0 + (r / f_scale) ** 2)
            for a in range(n_par):
                ja = jac[p, a] / sigma[p]
                gradient[a] += w * ja * r
                for b in range(a + 1):
                    normal[a, b] += w * ja * jac[p, b] / sigma[p]
        for a in range(n_par):
            for b in range(a):
                normal[b, a] = normal[a, b]
        improved = False
        for _attempt in range(12):
            system = normal.copy()
            for a in range(n_par):
                system[a, a] += damping * max(normal[a, a], 1e-300)
            step = np.linalg.solve(system, -gradient)
            trial = params + step
            for a in range(n_par):
                trial[a] = min(max(trial[a], lower[a]), upper[a])
            ok = _model_jacobian(kind, fixed_beta, trial, px, py, cells, nodes, weights,
                                 trial_model, trial_jac)  # fmt: skip
            new_cost = _robust_cost(trial_model, values, sigma, f_scale) if ok else np.inf
            if new_cost <= cost:
                change = cost - new_cost
                moved = 0.0
                for a in range(n_par):
                    moved = max(moved, abs(trial[a] - params[a]) / (abs(params[a]) + 1e-8))
                params = trial
                model[:] = trial_model
                jac[:] = trial_jac
                cost = new_cost
                damping = max(damping / 3.0, 1e-9)
                improved = True
                if change <= 1e-10 * cost or moved <= 1e-10:
                    converged = True
                break
            damping *= 4.0
        if not improved:  # no step lowers the cost: at the minimum to working precision
            converged = True
        if converged:
            break
    for p in range(n):
        residual[p] = (model[p] - values[p]) / sigma[p]
    return params, residual, converged


# -- per-source fits --------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceShapes:
    """Per-source PSF fits: rows of the stars given to :func:`fit_source_shapes`.

    ``flux`` (e⁻, the channel's collected flux), ``x``, ``y`` (px), ``s``, ``d``, ``k``,
    ``chi2`` (per degree of freedom), ``npix`` and ``ok`` (the fit converged to a
    positive-definite shape and a positive flux).
    """

    flux: np.ndarray
    x: np.ndarray
    y: np.ndarray
    s: np.ndarray
    d: np.ndarray
    k: np.ndarray
    chi2: np.ndarray
    npix: np.ndarray
    ok: np.ndarray
    beta: np.ndarray | None = None  # per star, when fitted


def _stamp(image, error, good, x, y, radius, channel_step, y0, x0):
    """Channel pixels within ``radius`` of (x, y): positions, values, variances."""
    ny, nx = image.shape
    lo_x = int(np.ceil((x - radius - x0) / channel_step)) * channel_step + x0
    lo_y = int(np.ceil((y - radius - y0) / channel_step)) * channel_step + y0
    xs = np.arange(max(lo_x, x0), min(int(x + radius) + 1, nx), channel_step)
    ys = np.arange(max(lo_y, y0), min(int(y + radius) + 1, ny), channel_step)
    if xs.size == 0 or ys.size == 0:
        return None
    py, px = np.meshgrid(ys, xs, indexing="ij")
    near = (px - x) ** 2 + (py - y) ** 2 <= radius**2
    py, px = py[near], px[near]
    sigma = error[py, px].astype(float)
    use = good[py, px] & np.isfinite(image[py, px]) & (sigma > 0) & np.isfinite(sigma)
    py, px = py[use], px[use]
    return px, py, image[py, px].astype(float), np.square(sigma[use])


def fit_source_shapes(
    image: np.ndarray,
    error: np.ndarray,
    good: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    background: np.ndarray,
    *,
    cells: np.ndarray,
    step: int,
    y0: int,
    x0: int,
    fwhm_guess: float,
    kind: str = "gaussian",
    beta: float = 3.5,
    radius: float | None = None,
    fit_beta: bool = False,
) -> SourceShapes:
    """Fit flux, centre and (S, D, K) of each star to its channel pixels.

    ``error`` (e⁻, the pixels' noise) weights the pixels; ``good`` marks usable pixels
    (saturated and masked ones False); ``background`` (e⁻ per channel pixel) is
    subtracted, not fitted. The fitting radius defaults to ``max(3, 2·fwhm_guess) + step`` px. With
    ``fit_beta`` (Moffat only) each star's β is a free parameter too (``beta`` of the
    result), starting from ``beta``.
    """
    code = PROFILES[kind]
    n = len(x)
    out = {name: np.full(n, np.nan) for name in ("flux", "x", "y", "s", "d", "k", "chi2")}
    npix = np.zeros(n, np.int64)
    ok = np.zeros(n, bool)
    betas = np.full(n, np.nan)
    fit_beta = fit_beta and code == MOFFAT
    radius = radius if radius is not None else max(3.0, 2.0 * fwhm_guess) + step
    start = shape_from_fwhm(np.array(fwhm_guess), np.array(fwhm_guess), np.array(0.0),
                            kind=kind, beta=beta)  # fmt: skip
    for i in range(n):
        stamp = _stamp(image, error, good, x[i], y[i], radius, step, y0, x0)
        if stamp is None or stamp[0].size < 12:
            continue
        px, py, values, var = stamp
        values = values - background[i]
        sigma = np.sqrt(var)
        total = max(float(values.sum()), 1.0)

        p0 = np.array([total, x[i], y[i], float(start[0]), 0.0, 0.0])
        lower = np.array([0.0, x[i] - 1.5, y[i] - 1.5, 1e-3, -np.inf, -np.inf])
        upper = np.array([np.inf, x[i] + 1.5, y[i] + 1.5, np.inf, np.inf, np.inf])
        if fit_beta:
            p0 = np.append(p0, beta)
            lower = np.append(lower, 1.2)
            upper = np.append(upper, 20.0)
        # soft-L1 loss: a faint neighbour's or a cosmic ray's pixels pull little
        p, residual, converged = fit_prf_lm(code, float(beta), p0, lower, upper,
                                            px.astype(float), py.astype(float), values,
                                            sigma, cells, _NODES, _WEIGHTS, 3.0,
                                            100)  # fmt: skip
        dof = max(px.size - p.size, 1)
        for name, value in zip(("flux", "x", "y", "s", "d", "k"), p[:6], strict=True):
            out[name][i] = value
        if fit_beta:
            betas[i] = p[6]
        out["chi2"][i] = float(np.sum(residual**2) / dof)
        npix[i] = px.size
        ok[i] = bool(converged and p[3] > np.hypot(p[4], p[5]) and p[0] > 0)
    return SourceShapes(**out, npix=npix, ok=ok, beta=betas if fit_beta else None)


# -- the smooth map ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeMap:
    """(S, D, K) as polynomials in normalised x, y (total order ≤ ``order_xy``) times
    magnitude (order ≤ ``order_mag``).

    ``coefficients`` is (3, n_terms) for S, D and K; ``x_scale``, ``y_scale`` map pixels
    to [−1, 1] (``u = (x − xc) / half``), ``mag_zero`` centres the magnitudes.
    """

    kind: str
    beta: float
    order_xy: int
    order_mag: int
    centre: tuple[float, float]
    half: tuple[float, float]
    mag_zero: float
    coefficients: np.ndarray
    used: int
    rms: tuple[float, float, float]
    mag_range: tuple[float, float] = (-np.inf, np.inf)

    def terms(self, x: np.ndarray, y: np.ndarray, mag: np.ndarray) -> np.ndarray:
        return polynomial_terms(
            (np.asarray(x, float) - self.centre[0]) / self.half[0],
            (np.asarray(y, float) - self.centre[1]) / self.half[1],
            # the magnitude term is not extrapolated beyond the stars that shaped it
            np.clip(np.nan_to_num(np.asarray(mag, float), nan=self.mag_zero), *self.mag_range)
            - self.mag_zero,
            self.order_xy,
            self.order_mag,
        )

    def shapes(self, x: np.ndarray, y: np.ndarray, mag: np.ndarray) -> np.ndarray:
        """(n, 3) S, D, K at each star."""
        return self.terms(x, y, mag) @ self.coefficients.T

    def fwhm(self, x, y, mag) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shapes = self.shapes(x, y, mag)
        return fwhm_of(*shapes.T, kind=self.kind, beta=self.beta)


def polynomial_terms(u: np.ndarray, v: np.ndarray, m: np.ndarray, order_xy: int,
                     order_mag: int) -> np.ndarray:  # fmt: skip
    """Monomials u^i v^j m^l, i + j ≤ order_xy, l ≤ order_mag: (n, n_terms)."""
    columns = []
    for level in range(order_mag + 1):
        for total in range(order_xy + 1):
            for i in range(total, -1, -1):
                columns.append(u**i * v ** (total - i) * m**level)
    return np.column_stack(columns) if columns else np.ones((len(u), 1))


def fit_shape_map(
    shapes: SourceShapes,
    mag: np.ndarray,
    shape: tuple[int, int],
    *,
    kind: str,
    beta: float,
    order_xy: int = 2,
    order_mag: int = 1,
    clip: float = 4.0,
    iterations: int = 5,
) -> ShapeMap:
    """Fit the smooth (S, D, K) map to the per-source shapes that fitted well.

    Sources are rejected iteratively where any of S, D, K lies more than ``clip`` robust
    σ from the map. The polynomial orders drop to what the number of sources supports
    (at least 3 sources per term). Raises ``ValueError`` with fewer than 3 sources.
    """
    ny, nx = shape
    use = shapes.ok & np.isfinite(shapes.s) & np.isfinite(mag)
    if use.sum() < 3:
        raise ValueError(f"only {int(use.sum())} stars fitted a PSF: at least 3 are needed")
    mag_zero = float(np.median(mag[use]))
    centre, half = ((nx - 1) / 2, (ny - 1) / 2), (max(nx / 2, 1.0), max(ny / 2, 1.0))
    while True:  # lower the orders until there are enough stars per term
        n_terms = (order_xy + 1) * (order_xy + 2) // 2 * (order_mag + 1)
        if use.sum() >= 3 * n_terms or (order_xy == 0 and order_mag == 0):
            break
        if order_mag > 0:
            order_mag -= 1
        else:
            order_xy -= 1
    values = np.column_stack([shapes.s, shapes.d, shapes.k])
    keep = use.copy()
    coefficients = np.zeros((3, n_terms))
    rms = (np.nan, np.nan, np.nan)
    for _ in range(iterations):
        draft = ShapeMap(kind, beta, order_xy, order_mag, centre, half, mag_zero,
                         coefficients, int(keep.sum()), rms)  # fmt: skip
        terms = draft.terms(shapes.x[keep], shapes.y[keep], mag[keep])
        coefficients = np.linalg.lstsq(terms, values[keep], rcond=None)[0].T
        draft = ShapeMap(kind, beta, order_xy, order_mag, centre, half, mag_zero,
                         coefficients, int(keep.sum()), rms)  # fmt: skip
        residual = values - draft.shapes(shapes.x, shapes.y, np.nan_to_num(mag))
        scale = 1.4826 * np.median(np.abs(residual[keep]), axis=0)
        rms = (float(scale[0]), float(scale[1]), float(scale[2]))
        new_keep = use & np.all(np.abs(residual) <= clip * np.maximum(scale, 1e-12), axis=1)
        if new_keep.sum() < max(3, n_terms) or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    mag_range = (float(np.min(mag[keep])), float(np.max(mag[keep])))
    return ShapeMap(kind, beta, order_xy, order_mag, centre, half, mag_zero, coefficients,
                    int(keep.sum()), rms, mag_range)  # fmt: skip
