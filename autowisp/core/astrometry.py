"""Astrometric solution of a frame: triangle matching, then an iterative TAN-SIP fit.

Pattern matching (:func:`candidate_seeds`): the brightest sources of each image cell and
the brightest catalogue stars of each equally sized window of the tangent plane around the
pointing hint form triangles with their nearest neighbours; the triangles' sorted side
ratios are invariant under translation, rotation, scale and parity, so a k-d tree finds
image and catalogue triangles of the same shape. Each pair of triangles proposes an affine
map; those that are a similarity of the expected scale (within the given uncertainty) are
verified by the number of other bright sources that land on catalogue stars, and the best
one seeds the fit.

Refinement (:func:`refine`): catalogue stars are projected through the current solution,
matched to the nearest sources (k-d tree, mutual nearest neighbours), and a TAN projection
with SIP distortion is fitted by linear least squares (:func:`fit_tan_sip`), first near the
seed with a linear model, then over the whole frame with the full polynomial order, with
the matching radius shrinking to a few times the residual RMS and 3σ outliers left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from autowisp.core.projection import (
    TanSip,
    angular_separation,
    monomials,
    tan_deproject,
    tan_project,
)

__all__ = [
    "MatchingPlan",
    "Solution",
    "SolveError",
    "candidate_seeds",
    "catalogue_in_frame",
    "check_fit",
    "fit_tan_sip",
    "matching_plan",
    "refine",
    "required_matches",
    "solve",
    "triangles",
]


def _tree(points) -> cKDTree:
    """A k-d tree built for a few queries: unbalanced and uncompacted builds twice as fast."""
    return cKDTree(points, balanced_tree=False, compact_nodes=False)


class SolveError(ValueError):
    """The frame cannot be solved; the message says why (too few sources, no match...)."""


@dataclass(frozen=True)
class Solution:
    """A frame's astrometric solution and how well it fits.

    ``source_index`` and ``catalogue_index`` are the matched pairs kept in the final fit;
    ``residual_px`` their distances (source − projected catalogue star).
    """

    wcs: TanSip
    source_index: np.ndarray
    catalogue_index: np.ndarray
    residual_px: np.ndarray
    rms_px: float
    rotation_deg: float
    parity: int
    pointing_offset_deg: float

    @property
    def matched(self) -> int:
        return int(self.source_index.size)


def triangles(
    x: np.ndarray, y: np.ndarray, *, neighbours: int = 5, min_side: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each point with pairs of its ``neighbours`` nearest points.

    Returns
    -------
    vertices : (T, 3) int ndarray
        Point indices, ordered so that the opposite sides are shortest to longest.
    invariants : (T, 2) ndarray
        ``(a / c, b / c)`` for the sides ``a <= b <= c``.
    """
    points = np.column_stack([x, y]).astype(float)
    members = np.arange(len(points))[None, :]
    if len(points) < 3:
        return np.zeros((0, 3), np.intp), np.zeros((0, 2))
    vertices, invariants = _collect(points, members, neighbours)
    p = points[vertices]
    longest = np.hypot(*(p[:, 0] - p[:, 1]).T)
    keep = longest > min_side
    return vertices[keep], invariants[keep]


def _window_members(
    x: np.ndarray,
    y: np.ndarray,
    centres: np.ndarray,
    half: float,
    per_window: int,
    tree: cKDTree | None = None,
) -> np.ndarray:
    """(W, per_window) indices of the first (brightest) points in each square window,
    padded with -1 (``tree``: a k-d tree of the points, if one exists)."""
    members = np.full((len(centres), per_window), -1, dtype=np.intp)
    if len(x) == 0 or len(centres) == 0:
        return members
    tree = tree if tree is not None else _tree(np.column_stack([x, y]))
    found = tree.query_ball_point(centres, half, p=np.inf, return_sorted=True)
    for row, indices in enumerate(found):
        first = indices[:per_window]
        members[row, : len(first)] = first
    return members


def _collect(
    points: np.ndarray, members: np.ndarray, neighbours: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of every window's points with pairs of their nearest neighbours in the
    same window (all windows at once), without repeats; see :func:`triangles`."""
    w, m = members.shape
    valid = members >= 0
    xy = np.where(valid[..., None], points[np.maximum(members, 0)], np.nan)
    distance = np.hypot(
        xy[:, :, None, 0] - xy[:, None, :, 0], xy[:, :, None, 1] - xy[:, None, :, 1]
    )
    distance[:, np.arange(m), np.arange(m)] = np.inf
    distance = np.where(np.isfinite(distance), distance, np.inf)
    k = min(neighbours, m - 1)
    if k < 2:
        return np.zeros((0, 3), np.intp), np.zeros((0, 2))
    near = np.argsort(distance, axis=2)[:, :, :k]  # (W, M, k) positions within the window
    near_ok = np.take_along_axis(distance, near, axis=2) < np.inf
    first, second = np.triu_indices(k, 1)
    own = np.broadcast_to(np.arange(m)[None, :, None], (w, m, first.size))
    combos = np.stack([own, near[:, :, first], near[:, :, second]], axis=-1)
    ok = valid[:, :, None] & near_ok[:, :, first] & near_ok[:, :, second]
    window = np.broadcast_to(np.arange(w)[:, None, None], ok.shape)
    local = combos[ok]
    global_index = members[window[ok][:, None], local]
    global_index = np.sort(global_index, axis=1)
    n = np.int64(len(points))
    key = (global_index[:, 0] * n + global_index[:, 1]) * n + global_index[:, 2]
    _, first_seen = np.unique(key, return_index=True)
    global_index = global_index[first_seen]
    return _triangle_shapes(points, global_index)


def _triangle_shapes(points: np.ndarray, combos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each triangle's vertices by opposite side and give its side ratios."""
    if combos.size == 0:
        return np.zeros((0, 3), np.intp), np.zeros((0, 2))
    p = points[combos]
    opposite = np.stack(
        [
            np.hypot(*(p[:, 1] - p[:, 2]).T),
            np.hypot(*(p[:, 2] - p[:, 0]).T),
            np.hypot(*(p[:, 0] - p[:, 1]).T),
        ],
        axis=1,
    )
    order = np.argsort(opposite, axis=1)
    sides = np.take_along_axis(opposite, order, axis=1)
    vertices = np.take_along_axis(combos, order, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        invariants = sides[:, :2] / sides[:, 2:3]
    keep = np.all(np.isfinite(invariants), axis=1) & (invariants[:, 0] > 0.05)
    return vertices[keep], invariants[keep]


def _affine_from_triangles(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(P, 3, 2) source and destination points to (P, 3, 2) affine maps ``[x y 1] @ M``."""
    design = np.concatenate([src, np.ones((*src.shape[:2], 1))], axis=2)
    with np.errstate(all="ignore"):
        good = np.abs(np.linalg.det(design)) > 1e-9
        result = np.full((*design.shape[:1], 3, 2), np.nan)
        result[good] = np.linalg.solve(design[good], dst[good])
    return result


#: Sources each candidate map is verified with (the nearest to its triangle).
VERIFY_SOURCES = 60

#: At most this many of the brightest sources take part in matching (large frames).
MAX_MATCH_SOURCES = 300

#: The fewest stars in agreement that accept a pattern match, however sparse the frame.
#: A wrong map still has its triangle's own 3 stars; each of the other N - 3 checked
#: sources lands by chance within r of one of the E catalogue stars of an nx × ny frame
#: with probability p = π r² E / (nx ny). The floor binds up to E = 12 (N = 36 sources
#: checked, see :func:`matching_plan`); on a 256 × 200 frame (the smallest we solve)
#: with r = 3 + 0.01 · 150 ≈ 4.5 px, p = 0.015 and the chance hits are Poisson with
#: λ = 33 p ≈ 0.5: P(≥ 2 extra) = 0.09, P(≥ 3) = 0.016, P(≥ 4) = 0.002. Of the up to
#: 3 × VERIFIED = 384 maps a search verifies, a floor of 5 would pass ~35 wrong ones a
#: frame, 6 a few, 7 about one. Votes only choose seeds: a seed is accepted when the
#: whole-frame fit then keeps :func:`required_matches` (≥ 6) mutual matches at an RMS
#: below ``max_rms`` (1 px), which a wrong seed's chance pairs (typically 2–4 px apart)
#: do not reach; at E ≤ 6 (p ≤ 0.008, λ ≤ 0.2) even P(≥ 3 extra) ≈ 0.001 per map. A
#: floor of 6 keeps the wrong seeds to a handful the fit rejects, while a frame with
#: 12 catalogue stars, of which ~9 are detected among its brightest sources, reaches
#: it; 5 would make wrong seeds outnumber right ones on sparse frames. Measured on 20
#: simulated 256-650 px frames with hints 12-90° off (160 searches): 129 found no
#: map with the votes needed (the best wrong ones had 3-7), the other 31 passed wrong
#: seeds to the fit, which rejected every one.
MIN_VOTES_FLOOR = 6

#: Votes required where the frame has plenty of catalogue stars (as robust as before).
MIN_VOTES_CAP = 8


@dataclass(frozen=True)
class MatchingPlan:
    """How many sources pattern matching uses, and how many must agree, for a frame
    expected to hold ``expected`` catalogue stars (see :func:`matching_plan`)."""

    expected: float
    sources: int  # the brightest image sources used for triangles and verification
    per_cell: int  # of those, the brightest of each image cell form triangles
    min_votes: int  # distinct catalogue stars a map must put sources on


def matching_plan(expected: float, *, cell_fraction: float = 1.0) -> MatchingPlan:
    """Matching limits for a frame expected to hold ``expected`` catalogue stars, of
    which a fraction ``cell_fraction`` falls in one image cell.

    The catalogue stars are among the brightest sources: three times as many of those
    are used (at least 30, at most :data:`MAX_MATCH_SOURCES`), so the many faint stars
    the catalogue lacks neither form triangles nor crowd the catalogue stars out of the
    :data:`VERIFY_SOURCES` that verify each map. Half the catalogue stars among those
    verifying sources must agree, at least :data:`MIN_VOTES_FLOOR` and at most
    :data:`MIN_VOTES_CAP`.
    """
    expected = max(float(expected), 0.0)
    sources = int(np.clip(np.ceil(3.0 * expected), 30, MAX_MATCH_SOURCES))
    verified = expected * min(1.0, VERIFY_SOURCES / sources)
    min_votes = int(np.clip(np.ceil(0.5 * verified), MIN_VOTES_FLOOR, MIN_VOTES_CAP))
    # Twice the catalogue stars of a cell, 12 to 20 (the catalogue windows hold 1.5×).
    per_cell = int(np.clip(np.ceil(2.0 * expected * cell_fraction), 12, 20))
    return MatchingPlan(expected, sources, per_cell, min_votes)


def required_matches(in_frame: int, *, fraction: float = 0.5) -> int:
    """Matched stars a fit must keep when ``in_frame`` catalogue stars fall on the frame:
    ``fraction`` of them, at least 6 (see :data:`MIN_VOTES_FLOOR`), at most 10."""
    return int(min(10, max(6, np.ceil(fraction * in_frame))))


@dataclass(frozen=True)
class _Seed:
    affine: np.ndarray  # (3, 2): [x y 1] @ affine = catalogue plane, in expected pixels
    votes: int
    centre: np.ndarray  # (2,) image position the seed was verified around
    source_index: np.ndarray  # the verified pairs
    catalogue_index: np.ndarray


def candidate_seeds(
    image_xy: np.ndarray,
    catalogue_xy: np.ndarray,
    shape: tuple[int, int],
    *,
    scale_tolerance: float = 0.2,
    per_cell: int | None = None,
    cell: float | None = None,
    tolerance: float = 0.006,
    verify_radius: float = 3.0,
    min_votes: int | None = None,
    expected: float | None = None,
    stages: tuple[float, ...] = (0.3, 1.0),
    max_cells: int = 4,
) -> Iterator[_Seed]:
    """Similarities mapping image pixels onto the catalogue's tangent plane, best first.

    ``image_xy`` are source positions, brightest first; ``catalogue_xy`` catalogue stars on
    the tangent plane at the pointing hint in units of the expected pixel scale,
    brightest first. The map may rotate by any angle, flip parity and scale by
    ``1 ± scale_tolerance``. The catalogue windows are searched nearest to the hint first
    (``stages``: fractions of the farthest window's distance), which is where a frame
    usually is. Each stage yields its best few maps supported by at least ``min_votes``
    distinct catalogue stars (the triangle's own three included); the caller verifies
    them by fitting. Raises :class:`SolveError` when no map at all is supported.

    ``expected`` is the number of catalogue stars expected in the frame (by default the
    catalogue's mean density times the frame's area); it sets, through
    :func:`matching_plan`, how many of the brightest sources take part, ``per_cell`` and
    ``min_votes`` unless they are given.
    """
    ny, nx = shape
    if len(image_xy) < 4:
        raise SolveError(f"only {len(image_xy)} sources: at least 4 are needed to match")
    if cell is None:
        cell = float(min(nx, ny))
    if expected is None:
        extent = float(np.max(np.hypot(catalogue_xy[:, 0], catalogue_xy[:, 1]), initial=1.0))
        expected = len(catalogue_xy) * nx * ny / (np.pi * extent**2)
    plan = matching_plan(expected, cell_fraction=min(1.0, cell * cell / (nx * ny)))
    per_cell = plan.per_cell if per_cell is None else per_cell
    min_votes = plan.min_votes if min_votes is None else min_votes
    # Only the brightest sources (indices stay those of the full list, brightest first).
    image_xy = image_xy[: plan.sources]
    half = cell / 2.0
    # Image cells and catalogue windows of the same size (windows overlap by half).
    cols = max(1, round(nx / cell))
    rows = max(1, round(ny / cell))
    image_centres = np.array(
        [((i + 0.5) * nx / cols, (j + 0.5) * ny / rows) for i in range(cols) for j in range(rows)]
    )
    # One matching cell suffices to seed the fit: use the four nearest the centre, where
    # the lens distorts least.
    from_centre = np.hypot(image_centres[:, 0] - nx / 2, image_centres[:, 1] - ny / 2)
    image_centres = image_centres[np.argsort(from_centre, kind="stable")[:max_cells]]
    image_members = _window_members(
        image_xy[:, 0], image_xy[:, 1], image_centres, max(nx / cols, ny / rows) / 2, per_cell
    )
    image_vertices, image_inv = _collect(image_xy, image_members)
    if len(image_vertices) == 0:
        raise SolveError("too few sources to form triangles")
    lo = catalogue_xy.min(axis=0)
    hi = catalogue_xy.max(axis=0)
    gx = np.arange(lo[0], hi[0] + half, half)
    gy = np.arange(lo[1], hi[1] + half, half)
    window_centres = np.stack(np.meshgrid(gx, gy, indexing="ij"), axis=-1).reshape(-1, 2)
    distance_from_hint = np.hypot(window_centres[:, 0], window_centres[:, 1])
    farthest = float(distance_from_hint.max())
    catalogue_tree = _tree(catalogue_xy)
    best_votes = -1
    searched = np.zeros(len(window_centres), bool)
    # First the windows within two cells of the hint (where most frames are), then
    # the stages' fractions of the whole search radius.
    limits = [STAGE0_CELLS * cell] + [stage * farthest for stage in stages]
    for limit in limits:
        chosen = ~searched & (distance_from_hint <= limit + 1e-9)
        if not chosen.any():
            continue
        searched |= chosen
        # The catalogue window must hold the stars an image cell holds at any scale and
        # rotation: a little wider than the cell, with a few more stars.
        members = _window_members(
            catalogue_xy[:, 0],
            catalogue_xy[:, 1],
            window_centres[chosen],
            half * 1.1,
            int(per_cell * 1.5),
            catalogue_tree,
        )
        catalogue_vertices, catalogue_inv = _collect(catalogue_xy, members)
        if len(catalogue_vertices) == 0:
            continue
        seeds, votes = _best_pair(
            image_xy, image_vertices, image_inv, catalogue_xy, catalogue_vertices,
            catalogue_inv, catalogue_tree, scale_tolerance=scale_tolerance,
            tolerance=tolerance, verify_radius=verify_radius, min_votes=min_votes,
        )  # fmt: skip
        best_votes = max(best_votes, votes)
        yield from seeds
    if best_votes < 0:
        raise SolveError(
            "no catalogue triangle around the pointing matches an image triangle at the "
            "expected pixel scale"
        )
    if best_votes < min_votes:
        raise SolveError(
            f"no match with the catalogue: about {expected:.0f} catalogue stars expected in "
            f"the frame; the best pattern match has {best_votes} stars in agreement, "
            f"{min_votes} are needed" + _too_sparse(expected, min_votes)
        )


def _too_sparse(expected: float, needed: int) -> str:
    """A hint for a frame that cannot hold enough catalogue stars to be matched."""
    if expected >= needed:
        return ""
    return (
        " (too few catalogue stars can fall on the frame to match it: its field of view "
        "is too small or the field too sparse for the catalogue)"
    )


def _best_pair(
    image_xy: np.ndarray,
    image_vertices: np.ndarray,
    image_inv: np.ndarray,
    catalogue_xy: np.ndarray,
    catalogue_vertices: np.ndarray,
    catalogue_inv: np.ndarray,
    catalogue_tree: cKDTree,
    *,
    scale_tolerance: float,
    tolerance: float,
    verify_radius: float,
    min_votes: int,
    keep: int = 3,
) -> tuple[list[_Seed], int]:
    """The triangle pairs whose similarities put most bright sources on catalogue stars
    (at most ``keep`` distinct ones with ``min_votes``), and the highest vote seen."""
    pairs = _tree(catalogue_inv).query_ball_point(image_inv, tolerance)
    left = np.repeat(np.arange(len(pairs)), [len(p) for p in pairs])
    if left.size == 0:
        return [], 0
    right = np.fromiter(itertools.chain.from_iterable(pairs), dtype=np.intp, count=left.size)
    affine = _affine_from_triangles(
        image_xy[image_vertices[left]], catalogue_xy[catalogue_vertices[right]]
    )
    # Singular values of the 2×2 linear parts in closed form: s1 ± s2, with s1 the
    # similarity part and s2 the anti-similarity (reflection) part.
    a, b = affine[:, 0, 0], affine[:, 0, 1]
    c, d = affine[:, 1, 0], affine[:, 1, 1]
    s1 = 0.5 * np.hypot(a + d, b - c)
    s2 = 0.5 * np.hypot(a - d, b + c)
    singular = np.column_stack([s1 + s2, np.abs(s1 - s2)])
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_scale = np.sqrt(singular[:, 0] * singular[:, 1])
        similar = (
            np.isfinite(affine).all(axis=(1, 2))
            & (singular[:, 1] > 0)
            & (singular[:, 0] / singular[:, 1] < 1.04)
            & (mean_scale > 1 / (1 + scale_tolerance) - 0.02)
            & (mean_scale < 1 + scale_tolerance + 0.02)
        )
    candidates = np.flatnonzero(similar)
    if candidates.size == 0:
        return [], 0
    # Verify each candidate around its own triangle: the bright sources nearest to it;
    # first cheaply with the 10 nearest, then the most promising with 60.
    bright = image_xy[:MAX_MATCH_SOURCES]
    bright_tree = _tree(bright)
    centres = image_xy[image_vertices[left[candidates]]].mean(axis=1)
    maps = affine[candidates]

    def landing(centres, maps, k):
        """The ``k`` bright sources nearest each centre, the catalogue star each lands
        on through its map, and whether it lands close enough."""
        k = min(k, len(bright))
        _, nearest = bright_tree.query(centres, k)
        nearest = nearest.reshape(len(centres), k)
        points = bright[nearest]  # (C, k, 2)
        mapped = points @ maps[:, :2, :] + maps[:, 2:3, :]
        reach = np.hypot(*(points - centres[:, None, :]).transpose(2, 0, 1))
        distance, target = catalogue_tree.query(mapped.reshape(-1, 2))
        agree = distance.reshape(mapped.shape[:2]) < verify_radius + 0.01 * reach
        return nearest, target.reshape(mapped.shape[:2]), agree

    cheap = landing(centres, maps, 10)[2].sum(axis=1)
    # The best VERIFIED go on, with at least three hits (a sparse small frame may have
    # only its triangle's own three stars among the ten).
    promising = np.argsort(-cheap, kind="stable")[:VERIFIED]
    promising = promising[cheap[promising] >= 3]
    centres, maps = centres[promising], maps[promising]
    nearest, target, agree = landing(centres, maps, VERIFY_SOURCES)
    # Votes: distinct catalogue stars hit (two sources on one star count once).
    hit = np.sort(np.where(agree, target, -1), axis=1)
    votes = (hit[:, 0] >= 0).astype(int) + np.sum(
        (np.diff(hit, axis=1) != 0) & (hit[:, 1:] >= 0), 1
    )
    seeds: list[_Seed] = []
    used_centres: list[np.ndarray] = []
    for best in np.argsort(-votes, kind="stable")[: 20 * keep]:
        if votes[best] < min_votes or len(seeds) >= keep:
            break
        # One seed per distinct map (where it puts the frame's origin).
        origin = maps[best][2]
        if any(np.hypot(*(origin - other)) < 5.0 for other in used_centres):
            continue
        used_centres.append(origin)
        seeds.append(
            _Seed(
                maps[best],
                int(votes[best]),
                centres[best],
                nearest[best][agree[best]],
                target[best][agree[best]],
            )
        )
    best_votes = int(votes.max()) if votes.size else 0
    return seeds, best_votes


def fit_tan_sip(
    x: np.ndarray,
    y: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    *,
    crpix: tuple[float, float],
    crval: tuple[float, float],
    order: int,
) -> TanSip:
    """Least-squares TAN-SIP solution mapping pixels ``(x, y)`` onto ``(ra, dec)``.

    ``crpix`` stays fixed; ``crval`` is iterated until the tangent point is the sky
    position of ``crpix``. The standard coordinates are fitted as a full polynomial of
    ``order`` in the pixel offsets: its linear part is the CD matrix, the rest, brought
    back through the inverse CD matrix, the SIP ``A``/``B`` coefficients.
    """
    x, y, ra, dec = (np.asarray(a, float) for a in (x, y, ra, dec))
    order = max(1, int(order))
    n_terms = (order + 1) * (order + 2) // 2
    if x.size < n_terms + 2:
        raise SolveError(
            f"{x.size} matched stars cannot constrain a polynomial of order {order} "
            f"({n_terms} terms per axis)"
        )
    u = x - crpix[0]
    v = y - crpix[1]
    norm = max(float(np.max(np.abs(np.concatenate([u, v])))), 1.0)
    design, terms = monomials(u / norm, v / norm, order)
    centre = np.asarray(crval, float)
    # Normal equations, formed once: the design does not change while CRVAL is iterated
    # (its columns are monomials of coordinates scaled to [-1, 1], well conditioned).
    normal = design.T @ design
    for _ in range(10):
        xi, eta, _ = tan_project(ra, dec, float(centre[0]), float(centre[1]))
        solution = np.linalg.solve(normal, design.T @ np.column_stack([xi, eta]))
        sol_xi, sol_eta = solution[:, 0], solution[:, 1]
        shift = np.array([sol_xi[0], sol_eta[0]])
        ra0, dec0 = tan_deproject(shift[0], shift[1], float(centre[0]), float(centre[1]))
        centre = np.array([float(ra0), float(dec0)])
        if np.hypot(*shift) < 1e-9:  # deg: 4 µas
            break
    index = {term: i for i, term in enumerate(terms)}
    cd = (
        np.array(
            [
                [sol_xi[index[(1, 0)]], sol_xi[index[(0, 1)]]],
                [sol_eta[index[(1, 0)]], sol_eta[index[(0, 1)]]],
            ]
        )
        / norm
    )
    inverse = np.linalg.inv(cd)
    size = max(order, 2) + 1
    a = np.zeros((size, size))
    b = np.zeros((size, size))
    for (p, q), i in index.items():
        if p + q < 2:
            continue
        scale = norm ** (p + q)
        a[p, q], b[p, q] = inverse @ np.array([sol_xi[i], sol_eta[i]]) / scale
    return TanSip(np.array(crpix, float), centre, cd, a, b)


def _mutual_matches(
    src_tree: cKDTree, cx: np.ndarray, cy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (source, catalogue) that are each other's nearest within ``radius``."""
    cat_index = np.flatnonzero(np.isfinite(cx) & np.isfinite(cy))
    if cat_index.size == 0 or src_tree.n == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    positions = np.column_stack([cx[cat_index], cy[cat_index]])
    d, nearest_src = src_tree.query(positions, distance_upper_bound=radius)
    found = np.flatnonzero(np.isfinite(d))
    if found.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    # The other way: each of those sources' nearest catalogue star must be this one.
    candidates = nearest_src[found]
    _, back = _tree(positions).query(src_tree.data[candidates])
    mutual = back == found
    return candidates[mutual], cat_index[found[mutual]]


def refine(
    wcs: TanSip,
    sx: np.ndarray,
    sy: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    shape: tuple[int, int],
    *,
    order: int,
    seed_centre: np.ndarray | None = None,
    start_radius: float = 6.0,
    min_radius: float = 1.0,
    clip: float = 3.0,
) -> tuple[TanSip, np.ndarray, np.ndarray, np.ndarray]:
    """Iterate matching and fitting from ``wcs``; returns the solution and final pairs.

    The fitted region starts around ``seed_centre`` (the frame centre by default) and
    grows to the whole frame while the order rises to ``order``.
    """
    ny, nx = shape
    diagonal = float(np.hypot(nx, ny))
    # Only catalogue stars that can fall on the frame (with a margin for the seed's error).
    _, _, cos_c = tan_project(ra, dec, float(wcs.crval[0]), float(wcs.crval[1]))
    reach_deg = 0.6 * diagonal * wcs.pixel_scale / 3600.0 + 0.05
    nearby = np.flatnonzero(cos_c > np.cos(np.radians(min(reach_deg, 80.0))))
    wcs, src, cat, residual = _refine(
        wcs, sx, sy, np.asarray(ra)[nearby], np.asarray(dec)[nearby], shape, order=order,
        seed_centre=seed_centre, start_radius=start_radius, min_radius=min_radius, clip=clip,
    )  # fmt: skip
    return wcs, src, nearby[cat], residual


def _sources_for(in_frame: int) -> int:
    """The brightest sources a fit matches when ``in_frame`` catalogue stars fall on the
    frame: six times as many, at least 30 (the previous limits bind on dense frames)."""
    return max(6 * in_frame, 30)


def _refine(
    wcs, sx, sy, ra, dec, shape, *, order, seed_centre, start_radius, min_radius, clip,
    subset=1500,
):  # fmt: skip
    ny, nx = shape
    diagonal = float(np.hypot(nx, ny))
    centre = np.array([nx / 2.0, ny / 2.0]) if seed_centre is None else np.asarray(seed_centre)
    crpix = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    # Matching happens in the solution's linear (undistorted) plane: sources go through
    # the SIP polynomials forwards, catalogue stars through TAN and CD only, so no
    # iterative SIP inversion is needed inside the loop.
    on_frame = (sx > -0.5) & (sx < nx - 0.5) & (sy > -0.5) & (sy < ny - 0.5)
    # The region around the seed grows until it holds the whole frame (its farthest
    # corner), the order rising with it; then matching radius and fit iterate together.
    whole = float(
        np.max(
            np.hypot(np.array([0, nx, 0, nx]) - centre[0], np.array([0, 0, ny, ny]) - centre[1])
        )
    )
    reach = 0.3 * diagonal
    radius = start_radius
    previous: np.ndarray | None = None
    src = cat = np.zeros(0, np.intp)
    # Until the solution covers the frame at full order, only the brightest stars take
    # part (enough to fit, cheap to match) until the matches settle; then one pass with
    # everything. The catalogue stars are among the brightest sources: a sparse frame's
    # fit uses no more than a few times as many, or the many faint stars the catalogue
    # lacks offer a wrong solution the chance coincidences it needs.
    catalogue_limit = max(subset // 3, 1)
    cx, cy = wcs.sky_to_intermediate(ra, dec)
    # Catalogue stars closer than 3 px to another one are one blended source: its
    # centroid is neither star's position, so they stay out of the fit (rare at the
    # catalogue's depth, but one such pair pulls a sparse frame's fit by 0.1-0.2 px).
    on_plane = np.flatnonzero(np.isfinite(cx) & np.isfinite(cy))
    pairs = _tree(np.column_stack([cx[on_plane], cy[on_plane]])).query_pairs(
        3.0, output_type="ndarray"
    )
    blended = np.zeros(len(ra), bool)
    blended[on_plane[pairs.ravel()]] = True
    subset = min(subset, _sources_for(int(np.sum((cx > 0) & (cx < nx) & (cy > 0) & (cy < ny)))))
    brightest = np.zeros(len(sx), bool)
    brightest[: max(subset, 1)] = True
    full = False
    for _ in range(40):
        covered = reach >= whole
        wanted = 1 if reach < 0.5 * diagonal else (min(order, 2) if not covered else order)
        near = on_frame & (np.hypot(sx - centre[0], sy - centre[1]) <= reach)
        if not full:
            near &= brightest
        chosen = np.flatnonzero(near)
        if full:
            cx, cy = wcs.sky_to_intermediate(ra, dec)
            # Catalogue stars are among the brightest sources: three times as many and a
            # margin suffice (on sparse frames, see above, six times as many).
            in_frame = int(np.sum((cx > 0) & (cx < nx) & (cy > 0) & (cy < ny)))
            chosen = chosen[: min(3 * in_frame + 200, _sources_for(in_frame))]
        else:
            cx, cy = wcs.sky_to_intermediate(ra[:catalogue_limit], dec[:catalogue_limit])
        ux, uy = wcs.distorted(sx[chosen], sy[chosen])
        margin = radius + 0.05 * diagonal
        usable = (cx > -margin) & (cx < nx + margin) & (cy > -margin) & (cy < ny + margin)
        usable &= ~blended[: len(cx)]
        cx = np.where(usable, cx, np.nan)
        local, cat = _mutual_matches(_tree(np.column_stack([ux, uy])), cx, cy, radius)
        src = chosen[local]
        if src.size < 6:
            raise SolveError(
                f"only {src.size} catalogue stars matched during the fit; the pattern "
                "match was probably wrong"
            )
        # As high an order as the matches support (3 stars per coefficient).
        current = wanted
        while current > 1 and src.size < 3 * (current + 1) * (current + 2) // 2:
            current -= 1
        residual = np.hypot(ux[local] - cx[cat], uy[local] - cy[cat])
        keep = np.ones(src.size, bool)
        if src.size > 20:
            spread = 1.4826 * np.median(residual)
            keep = residual <= max(clip * spread, 0.5 * min_radius)
        src, cat = src[keep], cat[keep]
        wcs = fit_tan_sip(
            sx[src],
            sy[src],
            ra[cat],
            dec[cat],
            crpix=crpix,
            crval=tuple(wcs.crval),
            order=current,
        )
        if covered and src.size <= 20:
            wcs, src, cat = _drop_outliers(wcs, sx, sy, ra, dec, src, cat, crpix, current)
        fx, fy = wcs.distorted(sx[src], sy[src])
        gx, gy = wcs.sky_to_intermediate(ra[cat], dec[cat])
        rms = float(np.sqrt(np.mean((fx - gx) ** 2 + (fy - gy) ** 2)))
        if not covered:
            reach = min(whole, reach * 2.2)
            continue
        if full:
            break  # one pass with everything (a second one changed nothing measurable)
        settled = previous is not None and np.array_equal(previous, src)
        new_radius = max(min_radius, min(radius, 5.0 * rms))
        # The order is final once it is the one wanted or the matches support no higher.
        final_order = current == wanted or src.size < 3 * (current + 2) * (current + 3) // 2
        if settled and new_radius == radius and final_order:
            full = True
            continue
        previous = src
        radius = new_radius
    px, py = wcs.sky_to_pixel(ra[cat], dec[cat])
    residual = np.hypot(sx[src] - px, sy[src] - py)
    return wcs, src, cat, residual


def _drop_outliers(wcs, sx, sy, ra, dec, src, cat, crpix, order, *, floor=0.8, rounds=2):
    """A fit of few stars without its worst ones: a star is left out when the fit of the
    others misses it by more than three times their RMS and ``floor`` px (with so few
    stars a median-based clip cannot tell a 1.5 px blend from a 0.3 px centroid)."""
    for _ in range(rounds):
        if src.size < CLIP_MIN_MATCHES:
            break
        fx, fy = wcs.distorted(sx[src], sy[src])
        gx, gy = wcs.sky_to_intermediate(ra[cat], dec[cat])
        worst = int(np.argmax(np.hypot(fx - gx, fy - gy)))
        rest = np.arange(src.size) != worst
        others = fit_tan_sip(
            sx[src[rest]], sy[src[rest]], ra[cat[rest]], dec[cat[rest]],
            crpix=crpix, crval=tuple(wcs.crval), order=order,
        )  # fmt: skip
        fx, fy = others.distorted(sx[src], sy[src])
        gx, gy = others.sky_to_intermediate(ra[cat], dec[cat])
        miss = np.hypot(fx - gx, fy - gy)
        rms_rest = float(np.sqrt(np.mean(miss[rest] ** 2)))
        if miss[worst] <= max(3.0 * rms_rest, floor):
            break
        wcs, src, cat = others, src[rest], cat[rest]
    return wcs, src, cat


#: Candidate maps verified with 60 sources, after the cheap 10-source test.
VERIFIED = 128

#: The first search covers catalogue windows within this many cells of the hint.
STAGE0_CELLS = 2.0

#: Outliers are clipped from fits with at least this many matches: a sparse frame's one
#: blended or mis-centred star would otherwise pull its few-star linear fit by ~0.1 of
#: its offset (a 1.5 px blend: 0.5 px errors across a 256 px frame with 11 stars).
CLIP_MIN_MATCHES = 8


def check_fit(
    residual: np.ndarray, *, min_matches: int, max_rms: float, in_frame: int | None = None
) -> float:
    """RMS of a fit's residuals (px), or :class:`SolveError` when it kept fewer than
    ``min_matches`` stars or its RMS exceeds ``max_rms``.

    ``min_matches`` ≤ 0: :func:`required_matches` of the ``in_frame`` catalogue stars
    the solution puts on the frame (10 if that count is not given).
    """
    if min_matches <= 0:
        min_matches = required_matches(in_frame) if in_frame is not None else 10
    if residual.size < min_matches:
        of = f" of {in_frame} catalogue stars in the frame" if in_frame is not None else ""
        raise SolveError(f"fit too poor: {residual.size} stars matched{of}, {min_matches} needed")
    rms = float(np.sqrt(np.mean(residual**2)))
    if rms > max_rms:
        raise SolveError(f"fit too poor: RMS residual {rms:.2f} px exceeds {max_rms} px")
    return rms


def catalogue_in_frame(wcs: TanSip, ra: np.ndarray, dec: np.ndarray, shape) -> int:
    """How many of the catalogue stars ``(ra, dec)`` ``wcs`` puts on a frame of ``shape``."""
    ny, nx = shape
    _, _, cos_c = tan_project(ra, dec, float(wcs.crval[0]), float(wcs.crval[1]))
    reach_deg = 0.6 * float(np.hypot(nx, ny)) * wcs.pixel_scale / 3600.0 + 0.05
    near = cos_c > np.cos(np.radians(min(reach_deg, 80.0)))
    x, y = wcs.sky_to_pixel(np.asarray(ra)[near], np.asarray(dec)[near])
    inside = np.isfinite(x) & (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
    return int(inside.sum())


def default_order(shape: tuple[int, int]) -> int:
    """SIP order by field size: 3 up to 2,000 px, 4 up to 4,000 px, 5 beyond."""
    size = max(shape)
    return 3 if size <= 2000 else 4 if size <= 4000 else 5


def solve(
    sx: np.ndarray,
    sy: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    shape: tuple[int, int],
    *,
    hint: tuple[float, float],
    pixel_scale: float,
    scale_tolerance: float = 0.2,
    order: int | None = None,
    min_matches: int = 0,
    max_rms: float = 1.5,
    max_seeds: int = 10,
) -> Solution:
    """Solve a frame from its sources (brightest first) and catalogue stars near ``hint``.

    Parameters
    ----------
    sx, sy : ndarray
        Source positions, 0-based pixels, brightest first.
    ra, dec : ndarray
        Catalogue stars (deg) around the hint, brightest first, covering the hint's
        uncertainty plus the field.
    shape : (ny, nx)
        Frame size.
    hint : (ra, dec)
        Approximate pointing, deg.
    pixel_scale : float
        Expected pixel scale, arcsec/px, good to ``scale_tolerance``.
    order : int, optional
        SIP order; :func:`default_order` by default.
    min_matches, max_rms : int, float
        The fit must keep this many stars and reach this RMS (px), or it fails;
        ``min_matches`` ≤ 0: :func:`required_matches` of the catalogue stars the solution
        puts on the frame (half of them, 6 to 10).

    Pattern matching adapts to the number of catalogue stars expected in the frame
    (:func:`matching_plan`): their density near the hint, or over the whole catalogue
    given (the frame may be anywhere within the pointing's uncertainty) if that is lower,
    times the frame's area.
    """
    sx = np.asarray(sx, float)
    sy = np.asarray(sy, float)
    if sx.size < 6:
        raise SolveError(f"too few sources: {sx.size} extracted, at least 6 are needed")
    if len(ra) < 6:
        raise SolveError(f"too few catalogue stars around the pointing: {len(ra)}")
    ny, nx = shape
    order = default_order(shape) if order is None else int(order)
    scale_deg = pixel_scale / 3600.0
    xi, eta, _ = tan_project(ra, dec, hint[0], hint[1])
    usable = np.isfinite(xi)
    plane = np.column_stack([xi[usable], eta[usable]]) / scale_deg
    # Cells of about 30 catalogue stars at the density near the hint.
    radius_px = np.sqrt((plane**2).sum(axis=1))
    density = max(np.sum(radius_px < 3 * max(nx, ny)), 1) / (np.pi * (3 * max(nx, ny)) ** 2)
    cell = float(np.clip(np.sqrt(30.0 / density), 0.25 * min(nx, ny), min(nx, ny)))
    # Catalogue stars expected in the frame: at the lower of the densities near the hint
    # and over the whole cone (an underestimate only uses fewer, brighter sources).
    extent = float(np.max(radius_px, initial=1.0))
    cone_density = len(plane) / (np.pi * extent**2)
    expected = min(density, cone_density) * nx * ny
    ra_all = np.asarray(ra, float)[usable]
    dec_all = np.asarray(dec, float)[usable]
    crpix = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    failure: SolveError | None = None
    found = None
    seeds = candidate_seeds(
        np.column_stack([sx, sy]), plane, shape, scale_tolerance=scale_tolerance, cell=cell,
        expected=expected,
    )  # fmt: skip
    for attempt, seed in enumerate(seeds):
        if attempt >= max_seeds:
            break
        try:
            wcs, src, cat, residual = _fit_from_seed(
                seed, sx, sy, ra_all, dec_all, shape, hint, scale_deg, crpix, order
            )
        except SolveError as error:
            failure = error
            continue
        try:
            in_frame = catalogue_in_frame(wcs, ra_all, dec_all, shape)
            rms = check_fit(residual, min_matches=min_matches, max_rms=max_rms, in_frame=in_frame)
        except SolveError as error:
            failure = error
            continue
        found = (wcs, src, cat, residual, rms)
        break
    if found is None:
        if failure is None:
            raise SolveError("no match with the catalogue")
        raise SolveError(
            f"no match with the catalogue: about {expected:.0f} catalogue stars expected in "
            f"the frame; no candidate pattern match fits (last: {failure})"
        )
    wcs, src, cat, residual, rms = found
    det = np.linalg.det(wcs.cd)
    parity = 1 if det < 0 else -1  # det < 0: as seen on the sky (east left of north)
    # Position angle of the frame's +y axis, east of north.
    rotation = float(np.degrees(np.arctan2(wcs.cd[0, 1], wcs.cd[1, 1])))
    offset = float(angular_separation(wcs.crval[0], wcs.crval[1], hint[0], hint[1]))
    catalogue_index = np.flatnonzero(usable)[cat]
    return Solution(wcs, src, catalogue_index, residual, rms, rotation, parity, offset)


def _fit_from_seed(seed, sx, sy, ra, dec, shape, hint, scale_deg, crpix, order):
    """A seed as a linear TAN WCS fitted on the sky to its verified pairs (the hint's
    tangent plane is itself distorted by a few per cent 10° from its centre), refined."""
    centre_plane = (np.array([*crpix, 1.0]) @ seed.affine) * scale_deg
    ra0, dec0 = tan_deproject(centre_plane[0], centre_plane[1], hint[0], hint[1])
    initial = fit_tan_sip(
        sx[seed.source_index],
        sy[seed.source_index],
        ra[seed.catalogue_index],
        dec[seed.catalogue_index],
        crpix=crpix,
        crval=(float(ra0), float(dec0)),
        order=1,
    )
    return refine(initial, sx, sy, ra, dec, shape, order=order, seed_centre=seed.centre)
