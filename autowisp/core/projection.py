"""Gnomonic (TAN) projection with SIP polynomial distortion, vectorised.

The model is the FITS TAN-SIP convention (Shupe et al. 2005) that astropy, DS9 and
astrometry.net read: a pixel offset ``(u, v)`` from the reference pixel is first
distorted, ``u' = u + A(u, v)``, ``v' = v + B(u, v)``, then mapped by the CD matrix to
intermediate world coordinates (degrees), then de-projected from the tangent plane at
``CRVAL``. Pixel coordinates here are 0-based (see :mod:`autowisp.core.bayer`); the
header written by :meth:`TanSip.to_header` uses FITS 1-based ``CRPIX``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

__all__ = [
    "TanSip",
    "angular_separation",
    "monomials",
    "sip_from_lens",
    "tan_deproject",
    "tan_project",
]


def tan_project(
    ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gnomonic projection of sky positions onto the tangent plane at ``(ra0, dec0)``.

    Parameters
    ----------
    ra, dec : array_like
        Sky positions in degrees.
    ra0, dec0 : float
        Tangent point in degrees.

    Returns
    -------
    xi, eta : ndarray
        Standard coordinates in degrees (``xi`` towards increasing RA, ``eta`` north).
    cos_c : ndarray
        Cosine of the angular distance from the tangent point; positions with
        ``cos_c <= 0`` are on the far hemisphere and have no projection (NaN).
    """
    ra_r = np.radians(np.asarray(ra, dtype=float))
    dec_r = np.radians(np.asarray(dec, dtype=float))
    ra0_r, dec0_r = np.radians(ra0), np.radians(dec0)
    dra = ra_r - ra0_r
    cos_dec = np.cos(dec_r)
    cos_c = np.sin(dec0_r) * np.sin(dec_r) + np.cos(dec0_r) * cos_dec * np.cos(dra)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(cos_c > 0, 1.0 / cos_c, np.nan)
    xi = cos_dec * np.sin(dra) * inv
    eta = (np.cos(dec0_r) * np.sin(dec_r) - np.sin(dec0_r) * cos_dec * np.cos(dra)) * inv
    return np.degrees(xi), np.degrees(eta), cos_c


def tan_deproject(
    xi: np.ndarray, eta: np.ndarray, ra0: float, dec0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`tan_project`: standard coordinates (deg) to RA, Dec (deg)."""
    xi_r = np.radians(np.asarray(xi, dtype=float))
    eta_r = np.radians(np.asarray(eta, dtype=float))
    dec0_r = np.radians(dec0)
    denominator = np.cos(dec0_r) - eta_r * np.sin(dec0_r)
    ra = np.degrees(np.arctan2(xi_r, denominator)) + ra0
    dec = np.degrees(
        np.arctan2(np.sin(dec0_r) + eta_r * np.cos(dec0_r), np.hypot(xi_r, denominator))
    )
    return np.mod(ra, 360.0), dec


def angular_separation(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    """Angular distance (deg) of positions from ``(ra0, dec0)``, all in degrees."""
    dec_r, dec0_r = np.radians(dec), np.radians(dec0)
    cos_distance = np.sin(dec_r) * np.sin(dec0_r) + np.cos(dec_r) * np.cos(dec0_r) * np.cos(
        np.radians(np.asarray(ra) - ra0)
    )
    return np.degrees(np.arccos(np.clip(cos_distance, -1.0, 1.0)))


def monomials(u: np.ndarray, v: np.ndarray, order: int) -> tuple[np.ndarray, list]:
    """Design matrix of ``u**p * v**q`` for ``p + q <= order`` (by running products), and
    the ``(p, q)`` of each column."""
    terms = [(p, q) for p in range(order + 1) for q in range(order + 1 - p)]
    u = np.asarray(u, dtype=float).ravel()
    v = np.asarray(v, dtype=float).ravel()
    u_powers, v_powers = [np.ones_like(u)], [np.ones_like(v)]
    for _ in range(order):
        u_powers.append(u_powers[-1] * u)
        v_powers.append(v_powers[-1] * v)
    design = np.empty((u.size, len(terms)))
    for column, (p, q) in enumerate(terms):
        np.multiply(u_powers[p], v_powers[q], out=design[:, column])
    return design, terms


def _poly(coefficients: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Evaluate ``sum_pq c[p, q] u**p v**q`` (Horner in ``v`` inside ``u``)."""
    order = coefficients.shape[0] - 1
    result = np.zeros(np.broadcast(u, v).shape)
    for p in range(order, -1, -1):
        inner = np.zeros_like(result)
        for q in range(order - p, -1, -1):
            inner = inner * v + coefficients[p, q]
        result = result * u + inner
    return result


def _poly_derivatives(coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coefficient arrays of the partial derivatives in ``u`` and ``v``."""
    order = coefficients.shape[0] - 1
    du = np.zeros_like(coefficients)
    dv = np.zeros_like(coefficients)
    for p in range(order + 1):
        for q in range(order + 1 - p):
            if p > 0:
                du[p - 1, q] += p * coefficients[p, q]
            if q > 0:
                dv[p, q - 1] += q * coefficients[p, q]
    return du, dv


@dataclass(frozen=True)
class TanSip:
    """A TAN-SIP world coordinate system.

    Attributes
    ----------
    crpix : (2,) ndarray
        Reference pixel ``(x, y)``, 0-based, px.
    crval : (2,) ndarray
        Sky position of the reference pixel ``(ra, dec)``, degrees.
    cd : (2, 2) ndarray
        Linear transform from distorted pixel offsets to intermediate world
        coordinates, degrees per pixel.
    a, b : (order + 1, order + 1) ndarray
        SIP forward coefficients ``A_p_q``, ``B_p_q`` (zero below total order 2).
    """

    crpix: np.ndarray
    crval: np.ndarray
    cd: np.ndarray
    a: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    b: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))

    @property
    def order(self) -> int:
        """SIP polynomial order."""
        return int(self.a.shape[0] - 1)

    @property
    def pixel_scale(self) -> float:
        """Mean pixel scale at the reference pixel, arcsec/px."""
        return float(np.sqrt(abs(np.linalg.det(self.cd))) * 3600.0)

    def pixel_to_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel positions to RA, Dec in degrees."""
        dx, dy = self.distorted(x, y)
        up, vp = dx - self.crpix[0], dy - self.crpix[1]
        xi = self.cd[0, 0] * up + self.cd[0, 1] * vp
        eta = self.cd[1, 0] * up + self.cd[1, 1] * vp
        return tan_deproject(xi, eta, float(self.crval[0]), float(self.crval[1]))

    def distorted(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel positions moved by the SIP polynomials (``crpix + (u', v')``): the linear
        TAN image of the sky, where :meth:`sky_to_intermediate` puts catalogue stars."""
        u = np.asarray(x, dtype=float) - self.crpix[0]
        v = np.asarray(y, dtype=float) - self.crpix[1]
        return u + _poly(self.a, u, v) + self.crpix[0], v + _poly(self.b, u, v) + self.crpix[1]

    def sky_to_intermediate(
        self, ra: np.ndarray, dec: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sky positions through TAN and the inverse CD matrix only (no SIP inversion):
        comparable with :meth:`distorted` source positions, in pixels."""
        xi, eta, _ = tan_project(ra, dec, float(self.crval[0]), float(self.crval[1]))
        inverse_cd = np.linalg.inv(self.cd)
        return (
            inverse_cd[0, 0] * xi + inverse_cd[0, 1] * eta + self.crpix[0],
            inverse_cd[1, 0] * xi + inverse_cd[1, 1] * eta + self.crpix[1],
        )

    def sky_to_pixel(
        self, ra: np.ndarray, dec: np.ndarray, *, tolerance: float = 1e-9, max_iter: int = 50
    ) -> tuple[np.ndarray, np.ndarray]:
        """RA, Dec (degrees) to 0-based pixel positions, inverting SIP by Newton's method.

        Positions on the far hemisphere, and positions so far outside the image that
        the distortion polynomial cannot be inverted there (the iteration does not reach
        ``tolerance`` px), come back as NaN.
        """
        target_x, target_y = self.sky_to_intermediate(ra, dec)
        target_u, target_v = target_x - self.crpix[0], target_y - self.crpix[1]
        u, v = target_u.copy(), target_v.copy()
        a_du, a_dv = _poly_derivatives(self.a)
        b_du, b_dv = _poly_derivatives(self.b)
        step = np.full(np.shape(u), np.inf)
        with np.errstate(all="ignore"):
            for _ in range(max_iter):
                res_u = u + _poly(self.a, u, v) - target_u
                res_v = v + _poly(self.b, u, v) - target_v
                j11 = 1.0 + _poly(a_du, u, v)
                j12 = _poly(a_dv, u, v)
                j21 = _poly(b_du, u, v)
                j22 = 1.0 + _poly(b_dv, u, v)
                det = j11 * j22 - j12 * j21
                step_u = (j22 * res_u - j12 * res_v) / det
                step_v = (j11 * res_v - j21 * res_u) / det
                u = u - step_u
                v = v - step_v
                step = np.hypot(step_u, step_v)
                if not np.any(step >= tolerance):  # NaN steps count as done
                    break
            failed = ~(step < tolerance)
        u = np.where(failed, np.nan, u)
        v = np.where(failed, np.nan, v)
        return u + self.crpix[0], v + self.crpix[1]

    @classmethod
    def from_header(cls, header) -> TanSip:
        """Read a TAN or TAN-SIP WCS (``CD`` or ``PC``/``CDELT``) from a FITS header."""
        for key in ("CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2"):
            if key not in header:
                raise ValueError(f"the header has no {key}: not a celestial WCS")
        if not str(header["CTYPE1"]).startswith("RA---TAN"):
            raise ValueError(f"CTYPE1={header['CTYPE1']!r} is not a TAN projection")
        if "CD1_1" in header:
            cd = np.array([[header.get(f"CD{i}_{j}", 0.0) for j in (1, 2)] for i in (1, 2)])
        else:
            pc = np.array(
                [[header.get(f"PC{i}_{j}", float(i == j)) for j in (1, 2)] for i in (1, 2)]
            )
            cd = pc * np.array([header.get("CDELT1", 1.0), header.get("CDELT2", 1.0)])[:, None]
        order = int(header.get("A_ORDER", 2))
        a = np.zeros((order + 1, order + 1))
        b = np.zeros((order + 1, order + 1))
        for p in range(order + 1):
            for q in range(order + 1 - p):
                a[p, q] = float(header.get(f"A_{p}_{q}", 0.0))
                b[p, q] = float(header.get(f"B_{p}_{q}", 0.0))
        return cls(
            np.array([float(header["CRPIX1"]) - 1.0, float(header["CRPIX2"]) - 1.0]),
            np.array([float(header["CRVAL1"]), float(header["CRVAL2"])]),
            cd.astype(float),
            a,
            b,
        )

    def to_header(self, *, inverse_order: int | None = None, shape=None) -> fits.Header:
        """FITS header of this WCS (1-based ``CRPIX``), readable by astropy and DS9.

        With ``shape`` (rows, columns) given, the inverse SIP coefficients ``AP``/``BP``
        of ``inverse_order`` (default ``order + 1``) are fitted over that image so that
        tools which do not iterate can go from sky to pixels too.
        """
        header = fits.Header()
        header["WCSAXES"] = 2
        header["CTYPE1"] = "RA---TAN-SIP"
        header["CTYPE2"] = "DEC--TAN-SIP"
        header["CUNIT1"] = "deg"
        header["CUNIT2"] = "deg"
        header["CRPIX1"] = float(self.crpix[0]) + 1.0
        header["CRPIX2"] = float(self.crpix[1]) + 1.0
        header["CRVAL1"] = float(self.crval[0])
        header["CRVAL2"] = float(self.crval[1])
        for i in range(2):
            for j in range(2):
                header[f"CD{i + 1}_{j + 1}"] = float(self.cd[i, j])
        header["RADESYS"] = "ICRS"
        for name, coefficients in (("A", self.a), ("B", self.b)):
            header[f"{name}_ORDER"] = self.order
            for p in range(self.order + 1):
                for q in range(self.order + 1 - p):
                    if p + q >= 2 and coefficients[p, q] != 0.0:
                        header[f"{name}_{p}_{q}"] = float(coefficients[p, q])
        if shape is not None:
            ap, bp = self._fit_inverse(shape, inverse_order or self.order + 1)
            for name, coefficients in (("AP", ap), ("BP", bp)):
                header[f"{name}_ORDER"] = coefficients.shape[0] - 1
                for p in range(coefficients.shape[0]):
                    for q in range(coefficients.shape[0] - p):
                        if coefficients[p, q] != 0.0:
                            header[f"{name}_{p}_{q}"] = float(coefficients[p, q])
        return header

    def _fit_inverse(self, shape, order: int) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares inverse polynomial ``u = u' + AP(u', v')`` over the image."""
        ny, nx = shape
        grid_y, grid_x = np.mgrid[0 : ny - 1 : 40j, 0 : nx - 1 : 40j]
        u = grid_x.ravel() - self.crpix[0]
        v = grid_y.ravel() - self.crpix[1]
        up = u + _poly(self.a, u, v)
        vp = v + _poly(self.b, u, v)
        scale = max(nx, ny)
        design, terms = monomials(up / scale, vp / scale, order)
        result = []
        for residual in (u - up, v - vp):
            solution, *_ = np.linalg.lstsq(design, residual, rcond=None)
            coefficients = np.zeros((order + 1, order + 1))
            for (p, q), value in zip(terms, solution, strict=True):
                coefficients[p, q] = value / scale ** (p + q)
            result.append(coefficients)
        return result[0], result[1]


def sip_from_lens(
    *, k1: float, k2: float = 0.0, p1: float = 0.0, p2: float = 0.0, order: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """SIP ``A``, ``B`` coefficients of a Brown–Conrady lens about the reference pixel.

    ``u' = u (1 + k1 r² + k2 r⁴) + 2 p1 u v + p2 (r² + 2 u²)`` and the symmetric
    expression for ``v'``, with ``r² = u² + v²`` in px² (so ``k1`` is in px⁻², ``k2``
    in px⁻⁴, ``p1``, ``p2`` in px⁻¹).
    """
    if order < 5 and k2 != 0.0:
        raise ValueError(f"k2={k2!r} needs SIP order 5, got order={order!r}")
    if order < 3:
        raise ValueError(f"SIP order must be at least 3 for radial distortion, got {order!r}")
    a = np.zeros((order + 1, order + 1))
    b = np.zeros((order + 1, order + 1))
    a[3, 0] = a[1, 2] = k1
    b[0, 3] = b[2, 1] = k1
    if k2:
        a[5, 0], a[3, 2], a[1, 4] = k2, 2 * k2, k2
        b[0, 5], b[2, 3], b[4, 1] = k2, 2 * k2, k2
    a[1, 1] += 2 * p1
    a[2, 0] += 3 * p2
    a[0, 2] += p2
    b[0, 2] += 3 * p1
    b[2, 0] += p1
    b[1, 1] += 2 * p2
    return a, b
