"""The piecewise bicubic PSF: a free-form PSF on a grid of cells, mapped over the frame.

The PSF around a source is defined on a grid of cell boundaries ``x_0 < … < x_{Gx−1}``,
``y_0 < … < y_{Gy−1}`` (px, offsets from the source centre). On every cell it is a
bicubic, continuous with its first derivatives and the cross derivative across cells:
bicubic Hermite interpolation of four unknowns per node (value, ∂/∂x, ∂/∂y, ∂²/∂x∂y).
All four vanish on the outer boundary, so the PSF is zero there and outside; the
remaining ``4 (Gx − 2)(Gy − 2)`` node values are the coefficients ``c`` of separable
basis functions ``B_p(x, y) = h_a(x) h_b(y)``, each ``h`` a cubic Hermite function of
one node (its value or its slope) on the two cells around it.

Because the basis is separable and piecewise cubic, the integral of every basis
function over an axis-aligned rectangle (a pixel, or the sensitive cell of a Bayer
channel's pixel) is exact: the product of two 1-D integrals of cubics, from their
closed-form antiderivatives. A channel pixel's pixel response (PRF) is therefore
``Σ_p c_p Σ_k w_k ∫∫_{cell k} B_p`` with the cells and weights of its sensitivity map
(:mod:`autowisp.core.subpixel`), with no quadrature.

Unit integral: the integral of the PSF is ``I · c`` with ``I_p = ∫∫ B_p``; writing
``c = I / |I|² + E q`` with ``E`` an orthonormal basis of the complement of ``I`` makes
it exactly 1 for any ``q`` (``n_free = n_basis − 1`` parameters). Each ``q_i`` is a
polynomial in terms of the source's position (normalised to [−1, 1] over the frame) and
magnitude (centred and scaled on the fitting stars, clamped to their range):
:class:`BicubicPSFMap`.

:func:`fit_bicubic_map` fits the map to chosen stars of one or several channels of the
same filter (one PSF; a flux per star and channel, or one per star with
``tie_fluxes``) by alternating linear least squares: the shape with the fluxes fixed
(one normal system, Cholesky, the unit integral as equality constraints), the fluxes
with the shape fixed (overlapping sources jointly, in groups of capped size), then
pixel rejection on unclipped residuals and source rejection by χ² before refitting.
In the fit the unit integral is imposed on the basis coefficients ``C`` (n_basis ×
n_terms) as ``I · C_0 = 1``, ``I · C_k = 0`` by a Schur complement, the same solution
as the ``E q`` parametrisation without projecting the normal matrix; the stored map
holds ``q``. :func:`bicubic_psf_photometry` measures every star's flux with a map.

Sampling by a Bayer channel. A source whose flux is free and whose pixels are one
Bayer channel's (a lattice of step 2) cannot tell the PSF ``f`` from ``f · p`` for any
function ``p`` of period 2: on its pixels ``f · p`` is ``f`` times ``p`` at the
source's phase, which the flux absorbs. Fitted with 1 px cells, one channel's map
drifts along that family (measured: FWHM 10–15 % too broad, flux pulls 4–6, even on
noiseless data with a constant PSF). Hence: cells finer than the super-pixel only
where a flux sees a finer lattice (monochrome, or G1 + G2 with ``tie_fluxes``: the
checkerboard, whose remaining period functions are those of frequency (π, ±π), where a
seeing PSF has almost no power) and the phases are covered (:func:`phase_coverage`);
with ``alias_constraint`` the PRF summed over the unit's lattice is the same at
``alias_phases²`` phases (:func:`lattice_sums`), which pins that family. One red or
blue channel uses cells of 2 px; at FWHM ≈ 2 px that cannot represent the PSF, and no
free-form fit of one channel can: its collected flux truly depends on the phase by a
few per cent there (an analytic PSF, :mod:`autowisp.core.psf`, is the tool).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve, lstsq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from autowisp.core.bayer import Channel
from autowisp.core.subpixel import channel_map

__all__ = [
    "BAD_PIXEL",
    "CUT_GROUP",
    "EDGE",
    "FAILED",
    "BicubicFit",
    "BicubicGrid",
    "BicubicPSFMap",
    "PSFPhotometry",
    "bicubic_psf_photometry",
    "default_grid",
    "fit_bicubic_map",
    "hermite_antiderivatives",
    "hermite_integrals",
    "hermite_values",
    "lattice_sums",
    "phase_coverage",
    "split_groups",
]


# --------------------------------------------------------------------------------------
# 1-D cubic Hermite functions and their exact integrals


def _antiderivatives(t: np.ndarray) -> np.ndarray:
    """∫_0^t of the four cubic Hermite functions H00, H10, H01, H11 of [0, 1] (4, …)."""
    t2 = t * t
    t3 = t2 * t
    t4 = t3 * t
    return np.stack([t4 / 2 - t3 + t, t4 / 4 - 2 * t3 / 3 + t2 / 2, -t4 / 2 + t3, t4 / 4 - t3 / 3])


def _values(t: np.ndarray) -> np.ndarray:
    """The four cubic Hermite functions of [0, 1] at t (4, …)."""
    t2 = t * t
    t3 = t2 * t
    return np.stack([2 * t3 - 3 * t2 + 1, t3 - 2 * t2 + t, -2 * t3 + 3 * t2, t3 - t2])


def _scatter(bounds: np.ndarray, k: int, parts: np.ndarray, out: np.ndarray) -> None:
    """Add cell k's four Hermite pieces (already in px units) to the node columns."""
    n_nodes = bounds.size
    for node, (value, slope) in ((k, (0, 1)), (k + 1, (2, 3))):
        if 1 <= node <= n_nodes - 2:
            out[:, 2 * (node - 1)] += parts[value]
            out[:, 2 * (node - 1) + 1] += parts[slope]


def hermite_antiderivatives(bounds: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``∫_{bounds[0]}^u h_j`` of the 1-D basis of interior nodes (m, 2 (G − 2)): the
    whole cells before ``u`` in closed form (``∫ h_value = (w_left + w_right) / 2``,
    ``∫ h_slope = (w_left² − w_right²) / 12``) plus the part of ``u``'s own cell."""
    bounds = np.asarray(bounds, float)
    u = np.asarray(u, float).ravel()
    n_nodes = bounds.size
    widths = np.diff(bounds)
    # per cell, the integrals of its four Hermite pieces, scattered to the node columns
    full = np.zeros((n_nodes - 1, 2 * (n_nodes - 2)))
    whole = _antiderivatives(np.ones(1))[:, 0]
    for j in range(n_nodes - 1):
        parts = (whole * widths[j] * np.array([1.0, widths[j], 1.0, widths[j]]))[:, None]
        _scatter(bounds, j, parts, full[j : j + 1])
    cumulative = np.vstack([np.zeros((1, full.shape[1])), np.cumsum(full, axis=0)])
    cell = np.searchsorted(bounds, u, side="right") - 1
    out = cumulative[np.clip(cell, 0, n_nodes - 1)].copy()
    out[cell < 0] = 0.0
    inside = np.flatnonzero((cell >= 0) & (cell < n_nodes - 1))
    if inside.size:
        k = cell[inside]
        w = widths[k]
        parts = _antiderivatives((u[inside] - bounds[k]) / w) * w
        parts[1] *= w
        parts[3] *= w
        for node, (value, slope) in ((k, (0, 1)), (k + 1, (2, 3))):
            ok = (node >= 1) & (node <= n_nodes - 2)
            rows, col = inside[ok], 2 * (node[ok] - 1)
            out[rows, col] += parts[value][ok]
            out[rows, col + 1] += parts[slope][ok]
    return out


def hermite_integrals(bounds: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Exact ``∫_lo^hi h_j`` of the 1-D basis of interior nodes (m, 2 (G − 2)), as the
    difference of :func:`hermite_antiderivatives`.

    Column ``2 (node − 1)`` is the node's value function (1 at the node, zero slope),
    column ``2 (node − 1) + 1`` its slope function (0 at every node, slope 1 at its own);
    the outer nodes (0 and G − 1) carry nothing: the PSF vanishes there.
    """
    lo = np.asarray(lo, float).ravel()
    hi = np.asarray(hi, float).ravel()
    both = hermite_antiderivatives(bounds, np.concatenate([lo, hi]))
    return both[lo.size :] - both[: lo.size]


def hermite_values(bounds: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The 1-D basis of interior nodes at points ``u`` (m, 2 (G − 2)); 0 outside."""
    bounds = np.asarray(bounds, float)
    u = np.asarray(u, float)
    out = np.zeros((u.size, 2 * (bounds.size - 2)))
    cell = np.searchsorted(bounds, u, side="right") - 1
    last = bounds.size - 2
    cell = np.where(u == bounds[-1], last, cell)
    for k in range(bounds.size - 1):
        here = cell == k
        if not here.any():
            continue
        width = bounds[k + 1] - bounds[k]
        parts = np.zeros((4, u.size))
        parts[:, here] = _values((u[here] - bounds[k]) / width)
        parts[1] *= width
        parts[3] *= width
        _scatter(bounds, k, parts, out)
    return out


# --------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class BicubicGrid:
    """Cell boundaries (px, offsets from the source centre) and the basis machinery.

    Basis function ``p = a · n_y + b`` is ``h_a(x) h_b(y)`` with ``a``, ``b`` columns of
    :func:`hermite_integrals`: for a node, (value, value) is its PSF value, (slope,
    value) its ∂/∂x, (value, slope) its ∂/∂y and (slope, slope) its ∂²/∂x∂y.
    """

    x_bounds: np.ndarray
    y_bounds: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("x_bounds", "y_bounds"):
            bounds = np.asarray(getattr(self, name), float)
            if bounds.ndim != 1 or bounds.size < 3 or np.any(np.diff(bounds) <= 0):
                raise ValueError(f"{name} must be ≥ 3 strictly increasing boundaries")
            object.__setattr__(self, name, bounds)

    @property
    def n_x(self) -> int:
        return 2 * (self.x_bounds.size - 2)

    @property
    def n_y(self) -> int:
        return 2 * (self.y_bounds.size - 2)

    @property
    def n_basis(self) -> int:
        return self.n_x * self.n_y

    @property
    def n_free(self) -> int:
        return self.n_basis - 1

    def extent(self) -> tuple[float, float, float, float]:
        return (
            float(self.x_bounds[0]),
            float(self.x_bounds[-1]),
            float(self.y_bounds[0]),
            float(self.y_bounds[-1]),
        )

    def rect_integrals(self, x0, x1, y0, y1) -> np.ndarray:
        """Exact ∫∫ of every basis function over rectangles (m, n_basis)."""
        ix = hermite_integrals(self.x_bounds, x0, x1)
        iy = hermite_integrals(self.y_bounds, y0, y1)
        return (ix[:, :, None] * iy[:, None, :]).reshape(ix.shape[0], -1)

    def values(self, dx, dy) -> np.ndarray:
        """Every basis function at points (m, n_basis)."""
        vx = hermite_values(self.x_bounds, dx)
        vy = hermite_values(self.y_bounds, dy)
        return (vx[:, :, None] * vy[:, None, :]).reshape(vx.shape[0], -1)

    def prf_matrix(self, dx, dy, cells: np.ndarray) -> np.ndarray:
        """Basis PRFs of channel pixels whose centres are at offsets (dx, dy) from the
        source: ``Σ_k w_k ∫∫_{cell k} B_p`` (m, n_basis) for sensitivity ``cells`` rows
        ``(dx0, dx1, dy0, dy1, w)`` relative to the pixel centre."""
        dx = np.asarray(dx, float)
        dy = np.asarray(dy, float)
        total = np.zeros((dx.size, self.n_basis))
        for x0, x1, y0, y1, weight in np.asarray(cells, float):
            total += weight * self.rect_integrals(dx + x0, dx + x1, dy + y0, dy + y1)
        return total

    def total_integral(self) -> np.ndarray:
        """∫∫ of every basis function over the whole grid (n_basis,)."""
        x0, x1, y0, y1 = self.extent()
        return self.rect_integrals(np.array([x0]), np.array([x1]), np.array([y0]), np.array([y1]))[
            0
        ]

    def constraint(self) -> tuple[np.ndarray, np.ndarray]:
        """(c0, E): c = c0 + E q has unit integral for any q (E orthonormal, ⟂ I)."""
        if "constraint" not in self._cache:
            integral = self.total_integral()
            c0 = integral / (integral @ integral)
            # the complement of I: the last n_basis − 1 columns of a complete QR of I
            q, _ = np.linalg.qr(integral[:, None], mode="complete")
            self._cache["constraint"] = (c0, np.ascontiguousarray(q[:, 1:]))
        return self._cache["constraint"]


def default_grid(
    fwhm: float, cell: float = 1.0, *, core: float = 1.5, extent: float = 5.0, growth: float = 2.0
) -> BicubicGrid:
    """A symmetric grid: cells of ``cell`` px out to ``core`` FWHM, then wider cells
    (each ``growth`` times the last) out to ``extent`` FWHM, where the PSF is zero.

    A node sits at the centre. The wide outer cells keep the parameter count low where
    a Moffat's wings are smooth; the extent sets how much of the wings the unit
    integral includes (a Moffat β = 3.5 has 0.2 % of its light beyond 3.5 FWHM).
    """
    fwhm = float(fwhm)
    half_core = max(core * fwhm, cell)
    bounds = [0.0]
    while bounds[-1] + cell <= half_core + 1e-9:
        bounds.append(bounds[-1] + cell)
    width = cell
    while bounds[-1] < extent * fwhm - 1e-9:
        width *= growth
        if bounds[-1] + width * 1.5 > extent * fwhm:
            bounds.append(max(extent * fwhm, bounds[-1] + cell))
            break
        bounds.append(bounds[-1] + width)
    half = np.array(bounds)
    full = np.concatenate([-half[:0:-1], half])
    return BicubicGrid(full, full.copy())


# --------------------------------------------------------------------------------------
# The map


def _term_powers(order_xy: int, order_mag: int) -> np.ndarray:
    return np.array(
        [
            (i, j - i, m)
            for m in range(order_mag + 1)
            for j in range(order_xy + 1)
            for i in range(j, -1, -1)
        ]
    )


@dataclass(frozen=True)
class BicubicPSFMap:
    """A bicubic PSF whose free parameters are polynomials in x, y and magnitude.

    ``coefficients`` (n_free, n_terms): ``q_i = Σ_k coefficients[i, k] term_k``, with
    terms ``u^a v^b m^c`` (``a + b ≤ order_xy``, ``c ≤ order_mag``), ``u``, ``v`` the
    position normalised to [−1, 1] over a frame of ``frame_shape`` and ``m = (mag −
    mag_zero) / mag_scale`` clamped to the fitted range ``[m_lo, m_hi]``.
    """

    grid: BicubicGrid
    coefficients: np.ndarray
    order_xy: int
    order_mag: int
    frame_shape: tuple[int, int]
    mag_zero: float = 0.0
    mag_scale: float = 1.0
    mag_range: tuple[float, float] = (-1.0, 1.0)

    def terms(self, x, y, mag) -> np.ndarray:
        """The polynomial terms of sources (n, n_terms)."""
        x, y, mag = np.broadcast_arrays(
            *(np.atleast_1d(np.asarray(v, float)) for v in (x, y, mag))
        )
        ny, nx = self.frame_shape
        u = 2.0 * x / max(nx - 1, 1) - 1.0
        v = 2.0 * y / max(ny - 1, 1) - 1.0
        m = np.clip(
            (np.nan_to_num(mag, nan=self.mag_zero) - self.mag_zero) / self.mag_scale,
            *self.mag_range,
        )
        powers = _term_powers(self.order_xy, self.order_mag)
        return u[:, None] ** powers[:, 0] * v[:, None] ** powers[:, 1] * m[:, None] ** powers[:, 2]

    @property
    def n_terms(self) -> int:
        return _term_powers(self.order_xy, self.order_mag).shape[0]

    def node_coefficients(self, x, y, mag) -> np.ndarray:
        """Basis coefficients ``c = c0 + E q`` of each source's PSF (n, n_basis)."""
        c0, basis = self.grid.constraint()
        q = self.terms(x, y, mag) @ self.coefficients.T
        return c0[None, :] + q @ basis.T

    def psf(self, x, y, mag, dx, dy) -> np.ndarray:
        """PSF (px⁻²) of the source at (x, y, mag) at offsets (dx, dy) (m,)."""
        c = self.node_coefficients(x, y, mag)[0]
        return self.grid.values(dx, dy) @ c

    def prf(self, x, y, mag, px, py, cells) -> np.ndarray:
        """PRF of channel pixels at full-frame centres (px, py) for the source at (x, y,
        mag): the fraction of its flux they collect, with sensitivity ``cells``."""
        c = self.node_coefficients(x, y, mag)[0]
        dx = np.asarray(px, float) - float(np.ravel(x)[0])
        dy = np.asarray(py, float) - float(np.ravel(y)[0])
        phi = self.grid.prf_matrix(dx, dy, cells)
        return phi @ c

    def shape(
        self, x, y, mag, *, angles: int = 36, resolution: float = 0.05, reach: float | None = None
    ) -> tuple[np.ndarray, ...]:
        """FWHM (px) along the major and minor axes and the major axis angle (rad,
        [0, π)) of the mapped PSF at each source.

        The width at half maximum of the profile through the peak is measured along
        ``angles`` directions (``resolution`` px samples, linear interpolation, out to
        ``reach`` px, default the grid's half-size); the major axis is the widest.
        """
        x, y, mag = (np.atleast_1d(np.asarray(v, float)) for v in (x, y, mag))
        coeffs = self.node_coefficients(x, y, mag)
        x0, x1, y0, y1 = self.grid.extent()
        if reach is None:
            reach = min(-x0, x1, -y0, y1)
        fine = np.arange(-1.0, 1.0 + 1e-9, 0.05)
        vx_peak = hermite_values(self.grid.x_bounds, fine)
        vy_peak = hermite_values(self.grid.y_bounds, fine)
        line = np.arange(-reach, reach + 1e-9, resolution)
        phi = np.arange(angles) * np.pi / angles
        majors, minors, thetas = (np.full(x.size, np.nan) for _ in range(3))
        for s in range(x.size):
            c = coeffs[s].reshape(self.grid.n_x, self.grid.n_y)
            core = vy_peak @ c.T @ vx_peak.T  # (y, x)
            iy, ix = np.unravel_index(np.argmax(core), core.shape)
            px = fine[ix] + np.outer(np.cos(phi), line)
            py = fine[iy] + np.outer(np.sin(phi), line)
            vx = hermite_values(self.grid.x_bounds, px.ravel())
            vy = hermite_values(self.grid.y_bounds, py.ravel())
            profiles = ((vx @ c) * vy).sum(axis=1).reshape(angles, -1)
            widths = np.array([_half_width(line, profile) for profile in profiles])
            if not np.isfinite(widths).any():
                continue
            best = int(np.nanargmax(widths))
            majors[s], minors[s] = np.nanmax(widths), np.nanmin(widths)
            thetas[s] = phi[best]
        return majors, minors, thetas


def _half_width(t: np.ndarray, profile: np.ndarray) -> float:
    """Width at half maximum of a 1-D profile sampled at increasing t."""
    top = int(np.argmin(np.abs(t))) if t.size else 0
    half = profile[top] / 2
    below = np.flatnonzero(profile[:top] < half)
    above = np.flatnonzero(profile[top:] < half)
    if below.size == 0 or above.size == 0:
        return np.nan
    i = below[-1]
    left = t[i] + (half - profile[i]) / (profile[i + 1] - profile[i]) * (t[i + 1] - t[i])
    j = top + above[0]
    right = t[j - 1] + (profile[j - 1] - half) / (profile[j - 1] - profile[j]) * (t[j] - t[j - 1])
    return float(right - left)


# --------------------------------------------------------------------------------------
# Pixels of sources, overlap groups and the flux solver


@dataclass
class _Units:
    """Sources × channels ("units"), each with its own flux, and their pixels.

    A unit's pixels are a lattice (rows × columns of its channel) around the source;
    its basis PRFs are separable per sensitive cell, ``Φ[(r, c), (a, b)] = Σ_k w_k
    X_k[c, a] Y_k[r, b]``, so only the 1-D integral matrices are stored.
    """

    star: np.ndarray  # (U,) index into the stars given
    channel: np.ndarray  # (U,) index into the channels given
    x: np.ndarray
    y: np.ndarray
    start: np.ndarray  # (U + 1,) offsets into the entry arrays (lattice, row-major)
    shape: list  # (rows, columns) of each unit's lattice
    basis: list  # per unit: [(w_k, X_k (columns, n_x), Y_k (rows, n_y)), ...]
    pix: np.ndarray  # (N,) index into the covered-pixel arrays below
    px: np.ndarray  # (N,) full-frame pixel centres
    py: np.ndarray
    # covered pixels (the union over units)
    data: np.ndarray  # (P,) image − background of the owner
    variance: np.ndarray  # (P,) background-level variance (the source's own light out)
    good: np.ndarray  # (P,)
    owner: np.ndarray  # (P,) unit whose background the pixel uses (the nearest)

    @property
    def count(self) -> np.ndarray:
        return np.diff(self.start)

    def unit_of_entry(self) -> np.ndarray:
        return np.repeat(np.arange(self.star.size), self.count)

    def prf(self, u: int, coefficients: np.ndarray) -> np.ndarray:
        """Unit u's PRF over its lattices (flattened) for basis coefficients (n_x, n_y)."""
        parts = []
        for (rows, cols), cells in zip(self.shape[u], self.basis[u], strict=True):
            out = np.zeros((rows, cols))
            for weight, xk, yk in cells:
                out += weight * (yk @ coefficients.T @ xk.T)
            parts.append(out.ravel())
        return np.concatenate(parts)

    def _blocks(self, u: int, values: np.ndarray):
        at = 0
        for (rows, cols), cells in zip(self.shape[u], self.basis[u], strict=True):
            yield values[at : at + rows * cols].reshape(rows, cols), cells
            at += rows * cols

    def project(self, u: int, values: np.ndarray) -> np.ndarray:
        """Φ_uᵀ v for values over unit u's lattices (flattened) → (n_x, n_y)."""
        out: Any = 0.0
        for v, cells in self._blocks(u, values):
            for weight, xk, yk in cells:
                out = out + weight * (xk.T @ v.T @ yk)
        return out

    def gram(self, u: int, weights: np.ndarray) -> np.ndarray:
        """Φ_uᵀ W Φ_u in the unpermuted layout (n_x², n_y²): [a a', b b'], from the
        1-D matrices (cost ∝ columns · n_x² · n_y², not pixels · n_basis²)."""
        out: Any = 0.0
        for w, cells in self._blocks(u, weights):
            rows, cols = w.shape
            for wk, xk, yk in cells:
                for wl, xl, yl in cells:
                    xx = (xk[:, :, None] * xl[:, None, :]).reshape(cols, -1)
                    yy = (yk[:, :, None] * yl[:, None, :]).reshape(rows, -1)
                    out = out + (wk * wl) * (xx.T @ (w.T @ yy))
        return out

    def single_cell(self) -> bool:
        return all(len(cells) == 1 for blocks in self.basis for cells in blocks)

    def packed_gram(self, u: int, weights: np.ndarray, tri_x, tri_y) -> np.ndarray:
        """:meth:`gram` on the pairs a ≤ a', b ≤ b' only (single-cell sensitivity maps,
        where the Gram matrix is symmetric in a ↔ a' and in b ↔ b' separately)."""
        out: Any = 0.0
        for w, ((weight, xk, yk),) in self._blocks(u, weights):
            xx = xk[:, tri_x[0]] * xk[:, tri_x[1]]
            yy = yk[:, tri_y[0]] * yk[:, tri_y[1]]
            out = out + (weight * weight) * (xx.T @ (w.T @ yy))
        return out


def _expansion(n_x: int, n_y: int, nt: int) -> np.ndarray:
    """Index of every element of Λ (unknowns (a, b, k)) in the packed accumulator
    [(a ≤ a') pair, (b ≤ b') pair, k, k'] (cached: it depends on the sizes only)."""
    key = (n_x, n_y, nt)
    if key not in _EXPANSIONS:
        pack_x = np.zeros((n_x, n_x), np.int64)
        ia, ja = np.triu_indices(n_x)
        pack_x[ia, ja] = pack_x[ja, ia] = np.arange(ia.size)
        pack_y = np.zeros((n_y, n_y), np.int64)
        ib, jb = np.triu_indices(n_y)
        pack_y[ib, jb] = pack_y[jb, ib] = np.arange(ib.size)
        k = np.arange(nt)
        index = (
            (pack_x[:, None, None, :, None, None] * ib.size + pack_y[None, :, None, None, :, None])
            * (nt * nt)
            + k[None, None, :, None, None, None] * nt
            + k[None, None, None, None, None, :]
        )
        size = n_x * n_y * nt
        _EXPANSIONS.clear()
        _EXPANSIONS[key] = index.reshape(size, size).astype(np.int32)
    return _EXPANSIONS[key]


_EXPANSIONS: dict = {}


def _build_units(image, variance, good, x, y, background, channels, grid, *, tie=False):
    """Every (star, channel) unit's channel pixels overlapping the grid, their 1-D basis
    integrals (with the channel's sensitivity cells) and the covered pixels' data. With
    ``tie``, one unit per star holds the lattices of all the channels (one flux)."""
    ny, nx = image.shape
    x0, x1, y0, y1 = grid.extent()
    units_star, units_channel, starts, shapes, bases = [], [], [0], [], []
    all_px, all_py, entry_channel = [], [], []
    background = np.asarray(background, float).reshape(x.size, -1)
    maps = [channel_map(channel).cells() for channel in channels]
    pairs = [(s, (c,)) for c in range(len(channels)) for s in range(x.size)]
    if tie:
        pairs = [(s, tuple(range(len(channels)))) for s in range(x.size)]
    for s, chosen in pairs:
        unit_shapes, unit_basis, size = [], [], 0
        for c in chosen:
            channel, cells = channels[c], maps[c]
            step = channel.step
            # channel pixels whose sensitive cells overlap the grid
            cx_lo = int(np.ceil((x[s] + x0 - cells[:, 1].max() - channel.x0) / step))
            cx_hi = int(np.floor((x[s] + x1 - cells[:, 0].min() - channel.x0) / step))
            cy_lo = int(np.ceil((y[s] + y0 - cells[:, 3].max() - channel.y0) / step))
            cy_hi = int(np.floor((y[s] + y1 - cells[:, 2].min() - channel.y0) / step))
            cols = np.arange(max(cx_lo, 0), cx_hi + 1) * step + channel.x0
            rows = np.arange(max(cy_lo, 0), cy_hi + 1) * step + channel.y0
            cols = cols[cols < nx]
            rows = rows[rows < ny]
            gy, gx = np.meshgrid(rows, cols, indexing="ij")
            size += gx.size
            unit_shapes.append((rows.size, cols.size))
            all_px.append(gx.ravel())
            all_py.append(gy.ravel())
            entry_channel.append(np.full(gx.size, c))
            unit_basis.append(
                [
                    (
                        w,
                        hermite_integrals(grid.x_bounds, cols - x[s] + cx0, cols - x[s] + cx1),
                        hermite_integrals(grid.y_bounds, rows - y[s] + cy0, rows - y[s] + cy1),
                    )
                    for cx0, cx1, cy0, cy1, w in cells
                ]
            )
        units_star.append(s)
        units_channel.append(chosen[0] if len(chosen) == 1 else -1)
        starts.append(starts[-1] + size)
        shapes.append(unit_shapes)
        bases.append(unit_basis)
    star = np.array(units_star, np.intp)
    chan = np.array(units_channel, np.intp)
    start = np.array(starts, np.intp)
    px = np.concatenate(all_px).astype(np.intp) if all_px else np.zeros(0, np.intp)
    py = np.concatenate(all_py).astype(np.intp) if all_py else np.zeros(0, np.intp)
    e_chan = np.concatenate(entry_channel) if entry_channel else np.zeros(0, np.intp)
    flat = py * nx + px
    covered, pix = np.unique(flat, return_inverse=True)
    entry_unit = np.repeat(np.arange(star.size), np.diff(start))
    ux, uy = x[star], y[star]
    distance = (px - ux[entry_unit]) ** 2 + (py - uy[entry_unit]) ** 2
    order = np.lexsort((distance, pix))
    first = order[np.r_[True, pix[order][1:] != pix[order][:-1]]] if order.size else order
    owner = entry_unit[first]
    values = image.ravel()[covered]
    var = variance.ravel()[covered]
    ok = good.ravel()[covered] & np.isfinite(values) & np.isfinite(var) & (var > 0)
    level = background[star[owner], e_chan[first]] if owner.size else np.zeros(0)
    data = np.where(ok, values - level, 0.0)
    # the pixel's variance without the source's own light (added back from the model),
    # so that a pixel's noise does not set its own weight
    base = np.where(ok, np.maximum(var - np.maximum(data, 0.0), 1e-6), 1.0)
    return _Units(star, chan, ux, uy, start, shapes, bases, pix, px, py, data, base, ok, owner)


def lattice_sums(grid: BicubicGrid, channels, phases: int = 4) -> np.ndarray:
    """Basis PRFs summed over the pixels of the channels' lattices, for a source at
    ``phases × phases`` sub-pixel phases of the super-pixel ((phases², n_basis)).

    ``Σ_pixels PRF`` is the fraction of its flux the channels collect; for a single
    Bayer channel it is the quantity a free per-star flux cannot tell from the flux
    (any PSF times a function of period ``step`` fits the same data with fluxes scaled
    by that function at each star's phase): :func:`fit_bicubic_map` pins it to be the
    same at every phase.
    """
    step = max(ch.step for ch in channels)
    x0, x1, y0, y1 = grid.extent()
    rows = []
    for jy in range(phases):
        for jx in range(phases):
            sx, sy = 50.0 + step * jx / phases, 50.0 + step * jy / phases
            total = np.zeros(grid.n_basis)
            for channel in channels:
                cells = channel_map(channel).cells()
                lo = int(np.floor((sx + x0 - 2) / step))
                hi = int(np.ceil((sx + x1 + 2) / step))
                cols = np.arange(lo, hi + 1) * step + channel.x0
                lo = int(np.floor((sy + y0 - 2) / step))
                hi = int(np.ceil((sy + y1 + 2) / step))
                rws = np.arange(lo, hi + 1) * step + channel.y0
                gy, gx = np.meshgrid(rws, cols, indexing="ij")
                total += grid.prf_matrix(gx.ravel() - sx, gy.ravel() - sy, cells).sum(axis=0)
            rows.append(total)
    return np.array(rows)


def split_groups(x: np.ndarray, y: np.ndarray, reach: float, max_group: int) -> list[np.ndarray]:
    """Overlap groups of sources (connected within ``reach`` px along both axes), those
    larger than ``max_group`` cut in halves along their longer spread until small enough.

    Pairs come from a k-d tree (memory ∝ the number of close pairs, never n²). Sources
    of a cut group are solved in turn, each piece with the others' current models fixed
    (block Gauss–Seidel), which converges to the joint solution.
    """
    n = x.size
    if n == 0:
        return []
    tree = cKDTree(np.column_stack([x, y]))
    pairs = tree.query_pairs(reach, p=np.inf, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    groups = []
    pending = list(np.split(order, cuts))
    while pending:
        members = pending.pop()
        if members.size <= max_group:
            groups.append(members)
            continue
        spread_x, spread_y = np.ptp(x[members]), np.ptp(y[members])
        key = x[members] if spread_x >= spread_y else y[members]
        sorted_members = members[np.argsort(key, kind="stable")]
        half = sorted_members.size // 2
        pending.extend([sorted_members[:half], sorted_members[half:]])
    return groups


def _group_layout(units, groups):
    """Per group: its pixels (covered-pixel indices) and where its members' entries go
    in the (pixels × members) design matrix. Computed once per set of groups."""
    layout = []
    for members in groups:
        idx = np.concatenate([np.arange(units.start[u], units.start[u + 1]) for u in members])
        local, inverse = np.unique(units.pix[idx], return_inverse=True)
        column = np.repeat(np.arange(members.size), units.count[members])
        layout.append((idx, local, inverse, column))
    return layout


def _solve_fluxes(
    units, prf, flux, groups, *, sweeps, tolerance=1e-4, layout=None, background_err=None
):
    """Weighted linear least-squares fluxes of units with fixed PRFs (entries ``prf``),
    group by group with the rest of the model fixed (block Gauss–Seidel sweeps until
    no flux moves by ``tolerance`` of its error); weights 1 / (background-level
    variance + model).

    Returns (flux, flux variance, background variance, model over covered pixels): the
    variances from each group's normal matrix at the end; the background part (with
    ``background_err`` per unit, the error of the background it subtracts from the
    pixels it owns) is ``Σ_o J_{u,o}² σ_o²``, ``J = −N⁻¹ Pᵀ W S`` with ``S`` the
    pixels' owners, so a background error is correlated over the star's pixels.
    """
    n_units = units.star.size
    entry_unit = units.unit_of_entry()
    if layout is None:
        layout = _group_layout(units, groups)
    model = np.zeros(units.data.size)
    np.add.at(model, units.pix, np.nan_to_num(flux)[entry_unit] * prf)

    def system(members, parts):
        idx, local, inverse, column = parts
        design = np.zeros((local.size, members.size))
        design[inverse, column] = prf[idx]
        weight = np.where(
            units.good[local], 1.0 / (units.variance[local] + np.maximum(model[local], 0)), 0.0
        )
        normal = design.T @ (design * weight[:, None])
        return design, local, weight, normal

    for _sweep in range(sweeps):
        change = 0.0
        for members, parts in zip(groups, layout, strict=True):
            design, local, weight, normal = system(members, parts)
            old = np.nan_to_num(flux[members])
            target = units.data[local] - (model[local] - design @ old)
            rhs = design.T @ (weight * target)
            diag = np.diag(normal)
            active = diag > 0
            new = np.full(members.size, np.nan)
            if active.any():
                try:
                    new[active] = np.linalg.solve(normal[np.ix_(active, active)], rhs[active])
                except np.linalg.LinAlgError:
                    pass
            fine = np.isfinite(new)
            delta = np.where(fine, new, 0.0) - old
            if fine.any():
                moved = np.abs(delta[fine]) * np.sqrt(diag[fine])
                change = max(change, float(moved.max()))
            flux[members] = new
            model[local] += design @ delta
        if change < tolerance:
            break
    variance = np.full(n_units, np.nan)
    bg_variance = np.zeros(n_units)
    for members, parts in zip(groups, layout, strict=True):
        design, local, weight, normal = system(members, parts)
        active = np.diag(normal) > 0
        if not active.any():
            continue
        try:
            cov = np.linalg.inv(normal[np.ix_(active, active)])
        except np.linalg.LinAlgError:
            continue
        act = members[active]
        variance[act] = np.diag(cov)
        if background_err is not None:
            owners, where = np.unique(units.owner[local], return_inverse=True)
            sens = np.zeros((owners.size, act.size))
            np.add.at(sens, where, design[:, active] * weight[:, None])
            jac = -(cov @ sens.T)  # (members, owners): d flux / d background
            bg_variance[act] = (jac**2) @ np.square(background_err[owners])
    return flux, variance, bg_variance, model


def _residual_chi2(units, model):
    """Per unit Σ w r² over its good pixels and the number of those pixels."""
    entry_unit = units.unit_of_entry()
    r = units.data - model
    var = units.variance + np.maximum(model, 0.0)
    z2 = np.where(units.good, r * r / var, 0.0)[units.pix]
    n_units = units.star.size
    chi2 = np.bincount(entry_unit, weights=z2, minlength=n_units)
    npix = np.bincount(entry_unit, weights=units.good[units.pix], minlength=n_units)
    return chi2, npix


# --------------------------------------------------------------------------------------
# Phase coverage


def phase_coverage(x, y, channels, cell: float, *, minimum: int = 3) -> tuple[bool, np.ndarray]:
    """Whether the stars' sub-pixel phases cover a channel's super-pixel finely enough
    for cells of ``cell`` px, and the counts per phase bin.

    A unit (star × channel) has phase ``((x − x0) mod step, (y − y0) mod step)`` on its
    channel's grid; the super-pixel is cut in ``ceil(step / cell)`` bins per axis (at
    least 2, so that even a monochrome fit finer than a pixel is checked) and every bin
    needs ``minimum`` units. Cells of ``step`` px or more need no coverage.
    """
    step = max(ch.step for ch in channels)
    if cell >= step:
        return True, np.zeros((1, 1), int)
    bins = max(int(np.ceil(step / cell)), 2)
    counts = np.zeros((bins, bins), int)
    for channel in channels:
        fx = np.mod(np.asarray(x, float) - channel.x0 + 0.5, channel.step) / channel.step
        fy = np.mod(np.asarray(y, float) - channel.y0 + 0.5, channel.step) / channel.step
        ix = np.minimum((fx * bins).astype(int), bins - 1)
        iy = np.minimum((fy * bins).astype(int), bins - 1)
        np.add.at(counts, (iy, ix), 1)
    return bool(counts.min() >= minimum), counts


# --------------------------------------------------------------------------------------
# The map fit


@dataclass(frozen=True)
class BicubicFit:
    """Result of :func:`fit_bicubic_map`; per-star arrays are (n_stars, n_channels)."""

    psf_map: BicubicPSFMap | None
    flux: np.ndarray
    flux_err: np.ndarray
    chi2: np.ndarray  # per degree of freedom
    used: np.ndarray  # (n_stars,) bool: shaped the final map
    diagnostics: dict = field(default_factory=dict)


def _as_channels(channels) -> tuple[Channel, ...]:
    if channels is None:
        return (Channel("L", "L", 0, 0, 1),)
    if isinstance(channels, Channel):
        return (channels,)
    return tuple(channels)


def _shape_normal(units, flux, weight, target, terms, which, n_x, n_y, prf=None, chunk=32):
    """Normal matrix and right-hand side of the shape step, fluxes fixed, for the basis
    coefficients ``C`` (n_basis × n_terms, unknown ``p · n_terms + k``).

    ``Λ = Σ_u A_u² (Φ_uᵀ W Φ_u) ⊗ (t_u t_uᵀ)`` over the units ``which``: the Gram matrices
    come from the separable 1-D integrals (:meth:`_Units.gram`) and are combined with the
    terms' outer products by one matrix product per chunk of units, so the (pixels ×
    unknowns) design matrix is never formed.

    With ``prf`` (the current PRFs), also the shape–flux coupling of the joint
    (Gauss–Newton) problem: per unit ``g_u = A_u (Φ_uᵀ W p_u) ⊗ t_u``, ``d_u = p_uᵀ W p_u``
    and the flux gradient ``p_uᵀ W (target − A_u p_u)``.
    """
    nt = terms.shape[1]
    n_basis = n_x * n_y
    rhs = np.zeros((n_basis, nt))
    coupling = np.zeros((n_basis * nt, which.size)) if prf is not None else None
    d_flux = np.zeros(which.size)
    g_flux = np.zeros(which.size)
    packed = units.single_cell()
    tri_x, tri_y = np.triu_indices(n_x), np.triu_indices(n_y)
    width = tri_x[0].size * tri_y[0].size if packed else n_x * n_x * n_y * n_y
    outer = np.zeros((width, nt * nt))
    for lo in range(0, which.size, chunk):
        block = which[lo : lo + chunk]
        grams = np.empty((block.size, width))
        for row, u in enumerate(block):
            sl = slice(units.start[u], units.start[u + 1])
            amp = flux[u]
            if packed:
                gram = units.packed_gram(u, weight[sl], tri_x, tri_y)
            else:
                gram = units.gram(u, weight[sl])
            grams[row] = (amp * amp) * gram.ravel()
            rhs += np.outer(amp * units.project(u, weight[sl] * target[sl]).ravel(), terms[u])
            if coupling is not None:
                wp = weight[sl] * prf[sl]
                coupling[:, lo + row] = np.outer(amp * units.project(u, wp).ravel(),
                                                 terms[u]).ravel()  # fmt: skip
                d_flux[lo + row] = wp @ prf[sl]
                g_flux[lo + row] = wp @ (target[sl] - amp * prf[sl])
        pairs = (terms[block][:, :, None] * terms[block][:, None, :]).reshape(block.size, -1)
        outer += grams.T @ pairs
    size = n_basis * nt
    if packed:
        lam = outer.ravel()[_expansion(n_x, n_y, nt)]
    else:
        lam = outer.reshape(n_x, n_x, n_y, n_y, nt, nt).transpose(0, 2, 4, 1, 3, 5)
        lam = np.ascontiguousarray(lam.reshape(size, size))
    if coupling is None:
        return lam, rhs.ravel()
    return lam, rhs.ravel(), (coupling, d_flux, g_flux)


def _solve_constrained(lam, rhs, integral, nt, extra=None, current=None):
    """Minimise the quadratic form subject to unit integral for every source: ``I · C_0
    = 1`` for the constant term and ``I · C_k = 0`` for the others (an exact equivalent
    of ``c = I/|I|² + E q``, solved by Cholesky of Λ and the Schur complement of the
    constraints instead of projecting Λ on E). ``extra`` rows ``L`` (n_basis) add
    ``L · C_k = 0`` for every term (the lattice-sum differences); the Schur system is
    solved by least squares, as those rows may be linearly dependent."""
    size = lam.shape[0]
    n_basis = size // nt
    rows = [integral] + ([] if extra is None else list(extra))
    constraint = np.zeros((len(rows) * nt, size))
    for r, row in enumerate(rows):
        for k in range(nt):
            constraint[r * nt + k, k::nt] = row
    goal = np.zeros(constraint.shape[0])
    goal[0] = 1.0
    if current is not None:  # a step from a feasible point keeps the constraints
        goal = goal - constraint @ current.ravel()
    try:
        factor = cho_factor(lam, lower=True, overwrite_a=True)
        free = cho_solve(factor, rhs)
        across = cho_solve(factor, constraint.T)
    except LinAlgError:
        free = lstsq(lam, rhs)[0]
        across = lstsq(lam, constraint.T)[0]
    schur = constraint @ across
    if extra is None:
        mu = np.linalg.solve(schur, constraint @ free - goal)
    else:
        scale = np.sqrt(np.abs(np.diag(schur))) + 1e-300
        mu = (
            lstsq(
                schur / scale[:, None] / scale[None, :],
                (constraint @ free - goal) / scale,
                cond=1e-10,
            )[0]
            / scale
        )
    return (free - across @ mu).reshape(n_basis, nt)


def _all_prf(units, full, terms, n_x, n_y):
    """Every entry's PRF for basis coefficients ``full`` (n_basis × n_terms)."""
    prf = np.empty(units.pix.size)
    per_unit = terms @ full.T  # (U, n_basis)
    for u in range(units.star.size):
        prf[units.start[u] : units.start[u + 1]] = units.prf(u, per_unit[u].reshape(n_x, n_y))
    return prf


def _initial_fluxes(units):
    """Background-subtracted sums of each unit's good pixels over its PRF-sum of a flat
    PSF (the unit's pixels cover the grid, so the sum is ≈ the flux)."""
    entry_unit = units.unit_of_entry()
    values = np.where(units.good, units.data, 0.0)[units.pix]
    n_units = units.star.size
    return np.bincount(entry_unit, weights=values, minlength=n_units)


def fit_bicubic_map(
    image: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    mag: np.ndarray,
    background: np.ndarray,
    *,
    channels=None,
    grid: BicubicGrid | None = None,
    fwhm_guess: float = 2.5,
    cell: float | None = None,
    order_xy: int = 2,
    order_mag: int = 0,
    pixel_rejection: float = 5.0,
    chi2_rejection: float = 5.0,
    max_group: int = 30,
    rejection_rounds: int = 1,
    iterations: int = 3,
    tolerance: float = 0.02,
    min_phase_stars: int = 3,
    ridge: float = 1e-6,
    tie_fluxes: bool = False,
    alias_constraint: bool | None = None,
    alias_phases: int = 4,
    flux0: np.ndarray | None = None,
    gauss_newton: bool = False,
) -> BicubicFit:
    """Fit a bicubic PSF map to stars of one or several channels of the same filter.

    ``image`` (e⁻), ``variance`` (e⁻²), ``good`` (bool) are full frames; ``x``, ``y``
    full-frame positions (px), ``mag`` magnitudes and ``background`` (e⁻ per channel
    pixel, (n,) or (n, n_channels)) of the fitting stars; ``channels`` the channels to
    fit jointly with one PSF (default: one monochrome channel): every star gets a flux
    per channel, or one for all of them with ``tie_fluxes`` (G1 and G2: one filter).
    The grid is ``grid`` or :func:`default_grid` of ``fwhm_guess`` with cells of
    ``cell`` px (default max(1, FWHM / 2)); a flux that sees one Bayer channel only
    gets cells of the super-pixel (``step`` px; see the module notes), and cells finer
    than that also need the stars' sub-pixel phases covered (:func:`phase_coverage`,
    ``min_phase_stars`` a bin). ``alias_constraint`` (default: on for Bayer channels)
    makes the PRF summed over a flux's lattice the same at ``alias_phases²`` phases.
    ``order_xy``, ``order_mag``: the map's polynomial orders. ``flux0``: starting
    fluxes (default: background-subtracted sums over the grid).

    Alternating least squares: the shape (all polynomial coefficients at once) is
    solved with the fluxes fixed from ``Λ = Σ_s A_s² (Φ_sᵀ W Φ_s) ⊗ (t_s t_sᵀ)`` by
    Cholesky (``Φ_s`` the star's basis PRFs, ``t_s`` its terms, ``W`` the inverse of
    the background-level variance plus the model), the unit integral an equality
    constraint; then fluxes with the shape fixed (overlap groups of at most
    ``max_group`` sources solved jointly); ``iterations`` times or until the fluxes
    change by less than ``tolerance`` of their errors. With ``gauss_newton`` the shape
    step is the Gauss–Newton step of the joint problem with the fluxes eliminated
    (``Λ − Σ_s g_s g_sᵀ / d_s``), which converges in a few iterations where plain
    alternation creeps (the tests measure both). Then pixels whose unclipped residual
    exceeds ``pixel_rejection`` σ are dropped, and sources whose flux is not positive,
    with < 2 good pixels, or whose χ²/dof exceeds the median by ``chi2_rejection``
    robust σ; and the fit is redone, ``rejection_rounds`` times. ``ridge`` × the normal
    matrix's mean diagonal pulls the coefficients to 0, keeping poorly sampled
    combinations (the frame's corners) finite.
    """
    channels = _as_channels(channels)
    image = np.asarray(image, float)
    variance = np.asarray(variance, float)
    good = np.asarray(good, bool)
    x, y, mag = (np.atleast_1d(np.asarray(v, float)) for v in (x, y, mag))
    n = x.size
    n_ch = len(channels)
    background = np.broadcast_to(np.asarray(background, float).reshape(n, -1), (n, n_ch))
    step = max(ch.step for ch in channels)
    diagnostics: dict = {}
    if grid is None:
        wanted = max(1.0, fwhm_guess / 2) if cell is None else float(cell)
        # A unit (one flux) seeing one Bayer channel only cannot tell structure finer
        # than the super-pixel from its flux: the PSF times any function of period
        # `step` fits its pixels as well, with the flux scaled by that function at the
        # star's phase. Finer cells need a unit to see a finer lattice (monochrome, or
        # G1 and G2 with tied fluxes: the checkerboard) and covered phases.
        lattice_step = step if (step > 1 and (n_ch == 1 or not tie_fluxes)) else 1
        if cell is None and lattice_step > 1:
            wanted = max(wanted, float(lattice_step))
        covered, counts = phase_coverage(x, y, channels, wanted, minimum=min_phase_stars)
        diagnostics["phase_counts"] = counts
        diagnostics["phase_covered"] = covered
        chosen = wanted if covered else max(wanted, float(step))
        grid = default_grid(fwhm_guess, chosen)
        diagnostics["cell"] = chosen
    finite_mag = np.isfinite(mag)
    mag_zero = float(np.median(mag[finite_mag])) if finite_mag.any() else 0.0
    mag_half = float(np.ptp(mag[finite_mag]) / 2) if finite_mag.sum() > 1 else 1.0
    mag_scale = mag_half if mag_half > 0 else 1.0
    m_scaled = (np.where(finite_mag, mag, mag_zero) - mag_zero) / mag_scale
    mag_range = (float(m_scaled.min()), float(m_scaled.max())) if n else (-1.0, 1.0)
    nt = _term_powers(order_xy, order_mag).shape[0]
    psf_map = BicubicPSFMap(
        grid,
        np.zeros((grid.n_free, nt)),
        order_xy,
        order_mag,
        image.shape,
        mag_zero,
        mag_scale,
        mag_range,
    )
    units = _build_units(image, variance, good, x, y, background, channels, grid, tie=tie_fluxes)
    n_units = units.star.size
    terms = psf_map.terms(x, y, mag)[units.star]
    if alias_constraint is None:
        alias_constraint = step > 1
    extra: Any = None
    if alias_constraint:
        sets = [channels] if tie_fluxes else [(ch,) for ch in channels]
        extra = []
        for group_channels in sets:
            sums = lattice_sums(grid, group_channels, alias_phases)
            extra.extend(sums[1:] - sums[0])
        extra = np.array(extra)
    c0, basis = grid.constraint()
    integral = grid.total_integral()
    entry_unit = units.unit_of_entry()
    flux = _initial_fluxes(units) / (n_ch if tie_fluxes else 1)
    if flux0 is not None:
        start = np.broadcast_to(np.asarray(flux0, float).reshape(n, -1), (n, n_ch))
        flux = np.where(
            np.isfinite(start[units.star, np.maximum(units.channel, 0)]),
            start[units.star, np.maximum(units.channel, 0)],
            flux,
        )
    flux_var = np.full(n_units, np.nan)
    active = np.ones(n, bool)
    reach = (grid.extent()[1] - grid.extent()[0]) + 2 * step
    groups = split_groups(units.x + 1e4 * units.channel, units.y, reach, max_group)
    layout = _group_layout(units, groups)
    iterations_run = 0
    full = np.zeros((grid.n_basis, nt))
    full[:, 0] = c0
    prf_now = _all_prf(units, full, terms, grid.n_x, grid.n_y)
    model = np.zeros(units.data.size)
    np.add.at(model, units.pix, flux[entry_unit] * prf_now)
    for round_ in range(rejection_rounds + 1):
        for _ in range(iterations):
            iterations_run += 1
            # (a) the shape, fluxes fixed
            unit_ok = active[units.star] & np.isfinite(flux) & (flux > 0)
            weight_pix = np.where(units.good, 1.0 / (units.variance + np.maximum(model, 0)), 0)
            w = weight_pix[units.pix]
            own = np.nan_to_num(flux)[entry_unit] * prf_now
            # each entry's target: the data minus the other units' models
            target = units.data[units.pix] - (model[units.pix] - own)
            which = np.flatnonzero(unit_ok)
            normal = _shape_normal(
                units,
                flux,
                w,
                target,
                terms,
                which,
                grid.n_x,
                grid.n_y,
                prf=prf_now if gauss_newton else None,
            )
            lam, rhs = normal[0], normal[1] - normal[0] @ full.ravel()
            if gauss_newton:
                coupling, d_flux, g_flux = normal[2]
                # Gauss–Newton step of the joint problem with the fluxes eliminated
                # (variable projection): plain alternation converges slowly along the
                # shape–flux trade-offs; the flux–flux coupling of overlapping stars is
                # left out here, and the exact group solve follows in (b).
                keep = d_flux > 0
                scaled = coupling[:, keep] / np.sqrt(d_flux[keep])
                lam -= scaled @ scaled.T
                rhs -= coupling[:, keep] @ (g_flux[keep] / d_flux[keep])
            # the ridge pulls the coefficients themselves (not the step) towards 0
            penalty = ridge * max(float(np.diag(lam).mean()), 1e-300)
            lam[np.diag_indices(lam.shape[0])] += penalty
            rhs -= penalty * full.ravel()
            full = full + _solve_constrained(lam, rhs, integral, nt, extra, current=full)
            # (b) the fluxes, shape fixed
            prf_now = _all_prf(units, full, terms, grid.n_x, grid.n_y)
            old = flux.copy()
            flux, flux_var, _, model = _solve_fluxes(
                units, prf_now, flux.copy(), groups, sweeps=4, layout=layout
            )
            err = np.sqrt(flux_var)
            moved = np.abs(flux - old) / np.where(err > 0, err, np.inf)
            if np.nanmax(np.where(active[units.star], moved, 0.0), initial=0.0) < tolerance:
                break
        if round_ == rejection_rounds:
            break
        # rejection: pixels on unclipped residuals, then sources
        var_model = units.variance + np.maximum(model, 0.0)
        z = (units.data - model) / np.sqrt(var_model)
        units.good &= ~(np.abs(z) > pixel_rejection)
        chi2, npix = _residual_chi2(units, model)
        dof = np.maximum(npix - 1, 1)
        reduced = chi2 / dof
        bad_unit = ~np.isfinite(flux) | (flux <= 0) | (npix < 2)
        ok = active[units.star] & ~bad_unit
        if ok.sum() >= 3:
            med = np.median(reduced[ok])
            mad = 1.4826 * np.median(np.abs(reduced[ok] - med))
            bad_unit |= reduced > med + chi2_rejection * max(mad, 1e-3 * med)
        for u in np.flatnonzero(bad_unit):
            active[units.star[u]] = False
    # the free parameters q = Eᵀ (C − c0 e_0ᵀ) (C − c0 e_0ᵀ has zero integral: in E's span)
    offset = full.copy()
    offset[:, 0] -= c0
    coefficients = basis.T @ offset
    psf_map = BicubicPSFMap(
        grid, coefficients, order_xy, order_mag, image.shape, mag_zero, mag_scale, mag_range
    )
    chi2, npix = _residual_chi2(units, model)
    out_flux = np.full((n, n_ch), np.nan)
    out_err = np.full((n, n_ch), np.nan)
    out_chi2 = np.full((n, n_ch), np.nan)
    columns = [units.channel] if not tie_fluxes else list(range(n_ch))
    for column in columns:
        out_flux[units.star, column] = flux
        out_err[units.star, column] = np.sqrt(flux_var)
        out_chi2[units.star, column] = chi2 / np.maximum(npix - 1, 1)
    diagnostics.update(
        iterations=iterations_run,
        n_free=grid.n_free,
        n_terms=nt,
        unknowns=grid.n_basis * nt,
        units=n_units,
        pixels=int(units.good.sum()),
        used=int(active.sum()),
    )
    return BicubicFit(psf_map, out_flux, out_err, out_chi2, active, diagnostics)


# --------------------------------------------------------------------------------------
# Photometry of every star with a fitted map


@dataclass(frozen=True)
class PSFPhotometry:
    """Per-star PSF-fitting fluxes (e⁻, the channel's collected flux) and their quality.

    ``flags`` bits: 1 no good pixel (no flux), 2 a bad (masked/saturated) pixel where
    the PRF is above 1 % of its peak, 4 the grid crosses the frame edge, 8 the star was
    solved in a group cut to the size cap.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    chi2: np.ndarray  # per degree of freedom
    npix: np.ndarray
    flags: np.ndarray
    largest_group: int = 0


FAILED, BAD_PIXEL, EDGE, CUT_GROUP = 1, 2, 4, 8


def bicubic_psf_photometry(
    image: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    mag: np.ndarray,
    background: np.ndarray,
    background_err: np.ndarray,
    psf_map: BicubicPSFMap,
    channel: Channel | None = None,
    *,
    max_group: int = 30,
    sweeps: int = 8,
    flux0: np.ndarray | None = None,
) -> PSFPhotometry:
    """Fluxes of all stars in one channel with the mapped PRF, overlapping stars jointly.

    Each star uses its channel pixels overlapping the PSF grid. Stars whose grids overlap
    form groups, cut to at most ``max_group`` (:func:`split_groups`); each group's fluxes
    are the weighted linear least-squares solution with the rest of the model fixed,
    swept ``sweeps`` times (block Gauss–Seidel; memory: one group's pixels × members).
    Weights are 1 / (background-level variance + model), so a pixel's own noise does
    not set its weight. ``flux_err`` is the group's covariance diagonal plus the
    background error: a pixel's background is that of its nearest star (``owner``), so
    ``flux = N⁻¹ Pᵀ W (d − b)`` moves by ``J_{s,o} = −(N⁻¹ Pᵀ W)_{s, pixels of o}``
    summed, per unit error of owner o's background, and ``var += Σ_o J_{s,o}² σ_o²``
    (for an isolated star ``(Σ w p / Σ w p²)² σ_bg²``: the error is correlated over the
    star's pixels, not averaged down).
    """
    channel = _as_channels(channel)[0]
    image = np.asarray(image, float)
    variance = np.asarray(variance, float)
    good = np.asarray(good, bool)
    x, y, mag = (np.atleast_1d(np.asarray(v, float)) for v in (x, y, mag))
    n = x.size
    background = np.asarray(background, float).reshape(n)
    background_err = np.nan_to_num(np.asarray(background_err, float).reshape(n))
    grid = psf_map.grid
    flux = np.full(n, np.nan)
    flux_err = np.full(n, np.nan)
    chi2 = np.full(n, np.nan)
    npix = np.zeros(n, np.int64)
    flags = np.zeros(n, np.uint8)
    ny, nx = image.shape
    x0, x1, y0, y1 = grid.extent()
    on = np.isfinite(x) & np.isfinite(y) & np.isfinite(background)
    on &= (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
    index = np.flatnonzero(on)
    flags[~on] |= FAILED
    if index.size == 0:
        return PSFPhotometry(flux, flux_err, chi2, npix, flags)
    units = _build_units(
        image, variance, good, x[index], y[index], background[index], (channel,), grid
    )
    coeffs = psf_map.node_coefficients(x[index], y[index], mag[index])
    prf = np.empty(units.pix.size)
    for u in range(index.size):
        prf[units.start[u] : units.start[u + 1]] = units.prf(
            u, coeffs[u].reshape(grid.n_x, grid.n_y)
        )
    entry_unit = units.unit_of_entry()
    edge = (x[index] + x0 < -0.5) | (x[index] + x1 > nx - 0.5) | (y[index] + y0 < -0.5)
    edge |= y[index] + y1 > ny - 0.5
    flags[index[edge]] |= EDGE
    peak = np.zeros(index.size)
    np.maximum.at(peak, entry_unit, prf)
    bad_near = np.zeros(index.size, bool)
    hit = ~units.good[units.pix] & (prf > 0.01 * peak[entry_unit])
    bad_near[entry_unit[hit]] = True
    flags[index[bad_near]] |= BAD_PIXEL
    reach = (x1 - x0) + 2 * channel.step
    groups = split_groups(units.x, units.y, reach, max_group)
    component = split_groups(units.x, units.y, reach, index.size)
    sizes = np.zeros(index.size, np.intp)
    for members in component:
        sizes[members] = members.size
    flags[index[sizes > max_group]] |= CUT_GROUP
    if flux0 is None:
        start = _initial_fluxes(units)
    else:
        start = np.asarray(flux0, float)[index].copy()
    start = np.where(np.isfinite(start), start, 0.0)
    fitted, fvar, err_bg, model = _solve_fluxes(
        units, prf, start, groups, sweeps=sweeps, background_err=background_err[index]
    )
    c2, used = _residual_chi2(units, model)
    flux[index] = fitted
    flux_err[index] = np.sqrt(fvar + err_bg)
    npix[index] = used.astype(np.int64)
    chi2[index] = c2 / np.maximum(used - 1, 1)
    failed = ~np.isfinite(flux)
    flags[failed] |= FAILED
    return PSFPhotometry(
        flux, flux_err, chi2, npix, flags, max((g.size for g in groups), default=0)
    )
